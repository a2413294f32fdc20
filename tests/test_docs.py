"""The reference pages are made from the code (`make docs`): a committed page that differs from what the code
makes now is stale, and this fails until `make docs` is run."""

from pathlib import Path

from conch_dna.cli.reference import pages

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_reference_pages_are_current():
    stale = [name for name, text in pages().items() if (DOCS / name).read_text() != text]
    assert stale == [], f"docs/{', docs/'.join(stale)} differ from the code: run `make docs`"


def test_every_setting_and_command_is_on_its_page():
    from conch_dna.settings.config import ServerSettings
    from conch_dna.training.kd_config import KDConfig

    config, cli = pages()["config.md"], pages()["cli.md"]
    assert all(f'id="server-{name}"' in config for name in ServerSettings.model_fields)
    assert all(f'id="kd-{name}"' in config for name in KDConfig.__dataclass_fields__)
    for command in ("conch kd retrain", "conch models import", "conch traces purge-quarantine", "conch serve"):
        assert f"## {command}\n" in cli
    assert "`--ranks`" in cli and "max_connections" in config

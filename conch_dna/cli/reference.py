"""The reference pages made from the code: docs/config.md from the settings' own metadata (the config models'
defaults, ranges and descriptions, KDConfig's fields), docs/cli.md from the commands' own parameters and help.

    python -m conch_dna.cli.reference          # (make docs) writes both; tests/test_docs.py fails when stale
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from conch_dna.settings.config import (
    Config,
    DistributedSettings,
    DomainSettings,
    EgoSettings,
    NeuronSettings,
    ServerSettings,
)
from conch_dna.training.kd_config import KDConfig, setting_default

DOCS = Path(__file__).resolve().parents[2] / "docs"
_SECTIONS = [("config.toml (top level)", "", Config), ("[neurons]", "neurons", NeuronSettings),
             ("[server]", "server", ServerSettings), ("[ego]", "ego", EgoSettings),
             ("[distributed]", "distributed", DistributedSettings), ("[domain.NAME]", "domain", DomainSettings)]
_TABLES = (NeuronSettings, ServerSettings, EgoSettings, DistributedSettings, KDConfig)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _bounds(field) -> str:
    parts = []
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sign} {getattr(m, attr)}")
    return ", ".join(parts)


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, (NeuronSettings, ServerSettings, EgoSettings, DistributedSettings, KDConfig)):
            return "(a table)"
        return repr(value)
    value = field.default
    return repr(value.value if hasattr(value, "value") else value)


def config_page() -> str:
    out = ["# Settings: config.toml", "",
           "Made from the code by `make docs` (conch_dna/cli/reference.py); do not edit by hand.",
           "`$CONCH_HOME/config.toml` (default `~/.conch/config.toml`) holds them; every one is optional.", ""]
    for title, table, model in _SECTIONS:
        out += [f"## {title}", "", "| setting | default | range | what it does |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if field.annotation in _TABLES or name == "domain":
                continue
            anchor = f"{table}-{name}" if table else name
            out.append(f"| <a id=\"{anchor}\"></a>`{name}` | `{_cell(_default(field))}` | {_cell(_bounds(field))} "
                       f"| {_cell(field.description or '')} |")
        out.append("")
    out += ["## [kd]", "", "The settings of every distillation run (`KDConfig`: the Python API, this table and the "
            "plain trainer's flags are one definition).", "",
            "| setting | default | range | what it does |", "|---|---|---|---|"]
    for f in dataclasses.fields(KDConfig):
        lo, hi, lo_open = f.metadata.get("range", (None, None, False))
        rng = "" if lo is None else f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else '∞'}]"
        out.append(f"| <a id=\"kd-{f.name}\"></a>`{f.name}` | `{_cell(repr(setting_default(f)))}` | {_cell(rng)} "
                   f"| {_cell(f.metadata.get('help', ''))} |")
    return "\n".join(out) + "\n"


def cli_page() -> str:
    from conch_dna.cli.main import app

    import typer

    root = typer.main.get_command(app)
    out = ["# The `conch` command", "", "Made from the commands by `make docs` (conch_dna/cli/reference.py); do not "
           "edit by hand. Every command also answers `--help`.", ""]

    def walk(cmd, path: list[str], ctx) -> None:
        if hasattr(cmd, "list_commands"):  # a group
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                walk(sub, [*path, name], typer.Context(sub, info_name=name, parent=ctx))
            return
        out.append(f"## conch {' '.join(path)}")
        out.append("")
        out.append(" ".join((cmd.help or "").split()))
        out.append("")
        usage = " ".join(cmd.collect_usage_pieces(ctx)).replace("{", "").replace("}", "")
        out.append(f"    conch {' '.join(path)} {usage}")
        out.append("")
        rows = []
        for p in cmd.params:
            if p.param_type_name == "argument":
                rows.append((p.name.upper(), "argument", getattr(p, "help", "") or ""))
            elif p.name != "help":
                default = "" if p.default in (None, False) or callable(p.default) else f" (default: {p.default})"
                rows.append((" / ".join(p.opts), "flag" if p.is_flag else "option", f"{p.help or ''}{default}"))
        if rows:
            out.extend(["| parameter | kind | what it does |", "|---|---|---|"])
            out.extend(f"| `{_cell(a)}` | {_cell(b)} | {_cell(c)} |" for a, b, c in rows)
            out.append("")

    walk(root, [], typer.Context(root, info_name="conch"))
    return "\n".join(out).rstrip("\n") + "\n"


def pages() -> dict[str, str]:
    return {"config.md": config_page(), "cli.md": cli_page()}


def main(argv: list[str] | None = None) -> int:
    for name, text in pages().items():
        (DOCS / name).write_text(text)
        print(f"wrote docs/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`conch demo` end to end, as `make demo` runs it: every demo domain promoted, one candidate rejected."""

import re
import stat

from tests.conftest import run_module


def test_demo_promotes_every_domain_and_rejects_the_noise_batch(tmp_path):
    home = tmp_path / "demo-home"
    proc = run_module("conch_dna.cli", "demo", "--home", str(home), timeout=900)  # a hang guard, not a speed test
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"OK: 2 of 2 domains promoted, [1-9]\d* candidate\(s\) rejected", proc.stdout)
    # `action` is asked with tools through conch serve; its promoted student answers with a call
    promoted = re.findall(r"action on (v\d{4}), through the OpenAI client: (.*)", proc.stdout)
    assert promoted and all(answer.startswith("tool call ") for _, answer in promoted), proc.stdout[-3000:]
    assert "action on base, through the OpenAI client:" in proc.stdout
    page = (home / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "rejected" in page
    assert "validated on, KL rose" in page  # the noise batch was stopped by the established held-out set
    # Traces are private: every file the demo, the daemon and its workers wrote is the user's alone.
    loose = [f"{p} {stat.S_IMODE(p.stat().st_mode):o}" for p in [home, *home.rglob("*")] if not p.is_symlink()
             and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not loose, loose


def test_demo_refuses_a_folder_it_did_not_make_and_deletes_nothing(tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    proc = run_module("conch_dna.cli", "demo", "--home", str(precious), timeout=120)
    assert proc.returncode == 2 and "not made by `conch demo`" in proc.stdout
    assert (precious / "chapter1.tex").read_text() == "years of work"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    proc = run_module("conch_dna.cli", "demo", "--home", str(a_file), timeout=120)
    assert proc.returncode == 2 and a_file.read_text() == "keep"


def test_demo_empties_a_home_it_made_before(tmp_path):
    from conch_dna.cli.demo import DEMO_MARK, prepare_home

    home = tmp_path / "demo-home"
    prepare_home(home)
    (home / "conch.db").write_text("old state")
    prepare_home(home)
    assert sorted(p.name for p in home.iterdir()) == [DEMO_MARK]
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and stat.S_IMODE((home / DEMO_MARK).stat().st_mode) == 0o600

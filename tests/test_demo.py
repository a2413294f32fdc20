"""`conch demo` end to end, as `make demo` runs it: every demo domain promoted, one candidate rejected."""

import re
import stat

from tests.conftest import run_module


def test_demo_promotes_every_domain_and_rejects_the_noise_batch(tmp_path):
    home = tmp_path / "demo-home"
    proc = run_module("conch_dna.cli", "demo", "--home", str(home), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"OK: 2 of 2 domains promoted, [1-9]\d* candidate\(s\) rejected", proc.stdout)
    page = (home / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "rejected" in page
    assert "validated on, KL rose" in page  # the noise batch was stopped by the established held-out set
    # Traces are private: every file the demo, the daemon and its workers wrote is the user's alone.
    loose = [f"{p} {stat.S_IMODE(p.stat().st_mode):o}" for p in [home, *home.rglob("*")] if not p.is_symlink()
             and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not loose, loose

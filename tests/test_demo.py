"""`conch demo` end to end, as `make demo` runs it: every demo domain promoted, one candidate rejected."""

import os
import re
import stat
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.conftest import run_module

ROOT = Path(__file__).resolve().parents[1]


def installed_wheel(tmp_path: Path) -> Path:
    """The project built as a wheel and installed, without its dependencies, into a fresh virtual environment
    that borrows them from the test's own (a path line, so that none of its .pth files, the checkout's editable
    install among them, is read); returns that environment's bin folder."""
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(dist), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = dist.glob("conch_dna-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.startswith("conch_dna-")} == {"conch_dna", "daemon", "neurons"}  # no stray
    assert any(n.endswith("kit/models/student/model.safetensors") for n in names)
    assert any(n.endswith("data/share/conch-dna/launchd/com.conch.dna.plist.template") for n in names)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [site] = (venv / "lib").glob("python*/site-packages")
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                                "--no-deps", "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv / "bin"


def test_the_installed_wheel_runs_the_demo_from_another_folder(tmp_path):
    """`pip install .` then `conch demo` anywhere, as `make demo` runs it: every demo domain promoted, one
    candidate rejected, the daemon's worker started from the installed package."""
    bin_dir = installed_wheel(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    home = elsewhere / "demo-home"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(bin_dir / "python"), "-c", "import conch_dna, daemon; print(conch_dna.__file__, "
                            "daemon.__file__)"], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=120)
    assert str(tmp_path / "venv") in where.stdout and str(ROOT) not in where.stdout, where.stdout + where.stderr
    proc = subprocess.run([str(bin_dir / "conch"), "demo", "--home", str(home)], cwd=elsewhere, capture_output=True,
                          text=True, env=env, timeout=900)  # a hang guard, not a speed test
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"OK: 2 of 2 domains promoted, [1-9]\d* candidate\(s\) rejected", proc.stdout)
    # `action` is asked with tools through conch serve; its promoted student answers with a call
    promoted = re.findall(r"action on (v\d{4}), through the OpenAI client: (.*)", proc.stdout)
    assert promoted and all(answer.startswith("tool call ") for _, answer in promoted), proc.stdout[-3000:]
    assert "action on base, through the OpenAI client:" in proc.stdout
    page = (home / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "rejected" in page  # per domain: loss, versions, auto/
    # each domain once more, student first: answered by its promoted version or, deferred, by the EGO
    auto = re.findall(r'(\w+), defer="auto": answered by (\S+) \(the student\'s confidence (-?[\d.]+|-inf)\)',
                      proc.stdout)
    assert len(auto) == 2 and all(by == "ego" or re.fullmatch(rf"{d}@v\d{{4}}", by) for d, by, _ in auto), auto
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

"""`conch kd report` on a home with real runs: a self-contained page with real PNG plots that a browser draws."""

import base64
import html
import os
import re
import shutil
import subprocess
from pathlib import Path

from conch_dna.cli.main import app
from conch_dna.lifecycle.report import build_report
from conch_dna.settings.config import load_config
from conch_dna.traces.ingest import ingest_bytes
from conch_dna.traces.store import TraceStore

import numpy as np
import pytest
from matplotlib import image as mpimg
from typer.testing import CliRunner

from tests.conftest import retrain
from tests.test_daemon import teacher_traces, write_config


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """A home with one promoted and one rejected run on `memory`, none on `debug`, and its report."""
    tmp = tmp_path_factory.mktemp("report")
    home = tmp / "home"
    write_config(home, min_heldout=1000)
    with (home / "config.toml").open("a") as f:
        f.write("steps_per_report = 2\n")  # into [kd]: five points per loss curve
    store = TraceStore.for_home(home, load_config(home))
    ingest_bytes(store, "\n".join(teacher_traces("memory", 24, seed=2)).encode(), "a")
    assert retrain(home, "memory", 10, force=True).status == "promoted"
    for outcome in ("served", "deferred", "deferred"):  # as auto/memory counts its calls
        store.count_auto_answer("memory", "v0001", outcome, teacher_seconds=2.0, agreed=False)
    assert retrain(home, "memory", 10).status == "skipped"  # nothing new: no run
    ingest_bytes(store, "\n".join(teacher_traces("memory", 24, seed=3)).encode(), "b")
    assert retrain(home, "memory", 10).status == "rejected"  # too few held-out, no --force

    result = CliRunner().invoke(app, ["kd", "report", "-o", str(tmp / "out")], env={"CONCH_HOME": str(home)})
    assert result.exit_code == 0, result.output
    return tmp / "out"


def test_report_has_plots_and_every_decision(report_dir):
    page = (report_dir / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # memory: loss curves, metrics per version, auto/'s share; debug has no run
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert (report_dir / "memory-loss.png").read_bytes().startswith(b"\x89PNG")
    assert (report_dir / "memory-auto.png").read_bytes().startswith(b"\x89PNG")
    assert "promoted" in page and "rejected" in page and "the gate needs 1000" in page
    assert "no training run yet" in page  # debug
    home = report_dir.parent / "home"
    runs = TraceStore.for_home(home, load_config(home)).runs("memory")
    assert len(runs) == 2
    for r in runs:  # both held-out KLs and the phases of every run
        assert r.current_metrics["on_policy"]["tokens"] > 0 and r.kl_change(on_policy=True) != "-"
        assert html.escape(r.kl_change()) in page and html.escape(r.kl_change(on_policy=True)) in page
        assert f"<td>{r.phase_seconds['sample']:.0f} / {r.phase_seconds['teacher']:.0f} / " in page
        # the settings the run changed from the defaults: config.toml's [kd] and --iters
        assert r.kd_settings["lora_rank"] == 8 and r.kd_settings["num_iters"] == 10
        assert "temperature" not in r.kd_settings
    assert "lora_rank = 8" in page and "num_iters = 10" in page
    promoted = next(r for r in runs if r.version == "v0001")
    expected = promoted.candidate_metrics["acceptance"]["expected_share"]
    assert f"<td>1 of 3 (33%; expected {expected:.0%})</td>" in page


def find_chromium() -> str | None:
    """Debian's chromium (`make test` installs it where it can), or a browser named by CONCH_CHROMIUM."""
    for name in (os.environ.get("CONCH_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"):
        if name and (shutil.which(name) or Path(name).is_file()):
            return shutil.which(name) or name
    return None


def run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # The background-networking flags keep Chromium from reaching out at all: the report is private data.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", f"--user-data-dir={profile}", "--hide-scrollbars"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    browser = find_chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium: `make test` installs Debian's chromium; CI must have it")
        pytest.skip("no chromium on this machine (set CONCH_CHROMIUM to a Chrome/Chromium binary)")

    # The browser itself reports how many plots it decoded: a probe script appended to a copy of the page.
    probe = tmp_path / "probe.html"
    probe.write_text((report_dir / "report.html").read_text().replace("</body>", """<script>
window.addEventListener('load', () => {
  const drawn = [...document.images].filter(i => i.complete && i.naturalWidth > 300);
  document.body.setAttribute('data-plots', drawn.length + ':' + drawn.map(i => i.alt).join(','));
});</script></body>"""))
    dom = run_chromium(browser, tmp_path / "profile-dom", "--virtual-time-budget=5000", "--dump-dom",
                       probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-plots="3:memory-loss,memory-versions,memory-auto"' in dom.stdout

    shot = tmp_path / "report.png"
    result = run_chromium(browser, tmp_path / "profile-shot", "--window-size=1200,1400", f"--screenshot={shot}",
                          (report_dir / "report.html").as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1400, 1200)

    def share(rgb_hex: str) -> float:
        """Fraction of the screenshot within a small distance of one colour."""
        rgb = np.array([int(rgb_hex[i:i + 2], 16) for i in (0, 2, 4)]) / 255
        return float((np.abs(pixels - rgb).max(axis=-1) < 0.08).mean())

    # Only the plots draw these: matplotlib's first line colour (loss curves), and the gate's green
    # (promoted candidate) and orange (rejected candidate) markers.
    assert share("1f77b4") > 1e-4, "no loss curve on screen"
    assert share("176317") > 1e-5, "no promoted marker on screen"
    assert share("c05800") > 1e-5, "no rejected marker on screen"
    assert share("ffffff") > 0.5  # a page, not an error screen


def test_report_on_many_runs_lists_every_run_and_plots_the_recent(tmp_path):
    home = tmp_path / "home"
    write_config(home)
    store = TraceStore.for_home(home, load_config(home))
    metrics = {"kl": 0.5, "ce": 0.7, "agreement": 0.8}
    for i in range(11):
        run = store.start_run("debug", iters=4)
        if i == 5:  # a crashed run: no history, no metrics
            store.finish_run(run, "failed", reason="worker killed by SIGKILL")
            continue
        store.finish_run(run, "promoted" if i % 2 else "rejected", reason=f"reason {i}", version=f"v{i:04d}",
                         history=[{"iteration": s, "combined": 2.0 - s / 10 - i / 100} for s in (1, 2, 3, 4)],
                         current_metrics={**metrics, "established": metrics},
                         candidate_metrics={**metrics, "kl": 0.5 - i / 100, "established": {**metrics, "kl": 0.6}})
    page = build_report(home, load_config(home), tmp_path / "out").read_text()
    assert len(re.findall(r"<tr><td>\d+</td>", page)) == 11
    assert "worker killed by SIGKILL" in page and "reason 10" in page
    assert (tmp_path / "out" / "debug-loss.png").stat().st_size > 1000


def test_what_a_trace_or_a_file_can_carry_is_escaped(tmp_path):
    """A run's reason quotes errors (trace text, paths) and a broken manifest quotes its file."""
    from conch_dna.settings.config import Config
    from conch_dna.traces.runs import RunStatus

    home = tmp_path / "home"
    config = Config(domains=["task"])
    store = TraceStore.for_home(home, config)
    run = store.start_run("task")
    store.finish_run(run, RunStatus.FAILED, reason='ValueError: <script>alert("reason")</script>')
    (home / "adapters_kd" / "task").mkdir(parents=True)
    (home / "adapters_kd" / "task" / "manifest.json").write_text('{"current": "<img src=x onerror=alert(1)>"}')
    page = build_report(home, config, tmp_path / "out").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;reason&quot;)" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page

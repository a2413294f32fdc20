"""`conch kd report` on a home with real runs: a self-contained page with real PNG plots."""

import base64
import re

from typer.testing import CliRunner

from conch_dna.cli import app
from conch_dna.config import load_config
from conch_dna.cycle import open_store, retrain_domain
from conch_dna.ingest import ingest_bytes
from tests.test_daemon import teacher_traces, write_config


def test_report_has_plots_and_every_decision(tmp_path, monkeypatch):
    home = tmp_path / "home"
    write_config(home, min_heldout=1000)
    ingest_bytes(open_store(home, load_config(home)), "\n".join(teacher_traces("memory", 24, seed=2)).encode(), "a")
    assert retrain_domain(home, "memory", iters=10, force=True).status == "promoted"
    assert retrain_domain(home, "memory", iters=10).status == "skipped"  # nothing new: no run
    ingest_bytes(open_store(home, load_config(home)), "\n".join(teacher_traces("memory", 24, seed=3)).encode(), "b")
    assert retrain_domain(home, "memory", iters=10).status == "rejected"  # too few held-out, no --force

    monkeypatch.setenv("CONCH_HOME", str(home))
    result = CliRunner().invoke(app, ["kd", "report", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "out" / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # memory: loss curves + metrics per version; debug has no run
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert (tmp_path / "out" / "memory-loss.png").read_bytes().startswith(b"\x89PNG")
    assert "promoted" in page and "rejected" in page and "the gate needs 1000" in page
    assert "no training run yet" in page  # debug

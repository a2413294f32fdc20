"""The fast BLAS in every conch process on Linux, its clean fallback, and `conch doctor`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conch_dna.system.blas import find_openblas, sgemm_provider, use_fast_blas

import pytest

needs_openblas = pytest.mark.skipif(find_openblas() is None and not os.environ.get("CI"),
                                    reason="no OpenBLAS installed (make test installs it as root)")
PROVIDER = "from conch_dna.system.blas import sgemm_provider, use_fast_blas; print(sgemm_provider()); " \
           "print(use_fast_blas().reason)"


def python(code: str, **env) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


@needs_openblas
def test_every_kind_of_conch_process_runs_mlx_on_openblas():
    assert "openblas" in sgemm_provider()  # this test process, through conftest's import
    entry_points = ("import conch_dna.cli", "import daemon.worker", "import neurons",
                    "import conch_dna.training.true_kd")
    for first in entry_points:
        provider, reason = python(f"{first}; import mlx.core; {PROVIDER}")
        assert "openblas" in provider and reason == "loaded before mlx", first


def test_fallback_to_mlx_own_blas_when_asked_or_too_late():
    provider, reason = python(f"import conch_dna; {PROVIDER}", CONCH_BLAS="reference")
    assert provider == "reference BLAS bundled with mlx" and reason == "CONCH_BLAS=reference"
    provider, reason = python(f"import mlx.core; {PROVIDER}")
    assert provider == "reference BLAS bundled with mlx" and "imported before conch_dna" in reason
    out = python("import conch_dna, mlx.core as mx; from conch_dna.system.blas import use_fast_blas; "
                 "print(use_fast_blas().reason); print((mx.ones((4, 4)) @ mx.ones((4, 4))).sum().item())",
                 CONCH_BLAS="/nonexistent/libopenblas.so")
    assert out[0].startswith("could not load /nonexistent/libopenblas.so") and out[1] == "64.0"


def test_use_fast_blas_reports_the_same_choice_twice():
    assert use_fast_blas() is use_fast_blas()


def doctor(conch_home, **env) -> dict:
    done = subprocess.run([sys.executable, "-m", "conch_dna.cli", "doctor", "--json"], capture_output=True,
                          text=True, env={**os.environ, "CONCH_HOME": str(conch_home), **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@needs_openblas
def test_doctor_reports_backend_blas_models_disk_and_daemon(conch_home, kit):
    conch_home.mkdir(mode=0o700)
    (conch_home / "config.toml").write_text(f'teacher = "{kit["teacher"]}"\nstudent = "/nowhere/student"\n')
    report = doctor(conch_home)
    checks = report["checks"]
    assert checks["mlx"]["details"]["backend"] == "CPU"
    assert "openblas" in checks["blas"]["details"]["provider"] and checks["blas"]["details"]["matmul_gflops"] > 0
    assert checks["teacher"]["ok"] and not checks["student"]["ok"]
    assert "model path does not exist: /nowhere/student" in checks["student"]["hint"]
    assert checks["memory"]["details"]["total_bytes"] > 2**30
    assert checks["disk"]["details"]["free_bytes"] > 0
    assert not checks["daemon"]["ok"] and "conch daemon run" in checks["daemon"]["hint"]
    assert report["ok"] is False


def test_doctor_hints_at_openblas_when_mlx_runs_on_the_reference_blas(conch_home):
    blas = doctor(conch_home, CONCH_BLAS="reference")["checks"]["blas"]
    assert blas["details"]["provider"] == "reference BLAS bundled with mlx"
    assert not blas["ok"] and "libopenblas0-pthread" in blas["hint"]

"""A person's first look at a machine: is everything in place to distil here, and if not, what to do.

Each check gives a value and, for a problem, a plain hint. `conch doctor [--json]` prints them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from conch_dna.system.blas import INSTALL_HINT, matmul_gflops, sgemm_provider, use_fast_blas
from conch_dna.system.home import NEURONS_DIR

# Below this a CPU-only machine trains even the kit slowly: the reference BLAS gives ~6 GFLOP/s.
MIN_CPU_GFLOPS = 30.0
MIN_FREE_DISK_GB = 5.0


@dataclass
class Check:
    name: str
    ok: bool
    value: str
    hint: str | None = None
    details: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def mlx_backend() -> str:
    """"Metal", "CUDA" or "CPU": where MLX runs its arrays by default here."""
    import mlx.core as mx

    if mx.metal.is_available():
        return "Metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "CUDA"
    return "CPU"


def check_backend() -> Check:
    import mlx.core as mx

    backend = mlx_backend()
    hint = None if backend != "CPU" or sys.platform.startswith("linux") else \
        "MLX runs on the CPU: on a Mac, check that this Python is arm64 (not Rosetta)"
    return Check("mlx", hint is None, f"{backend} (mlx {mx.__version__})", hint,
                 {"backend": backend, "version": mx.__version__})


def check_blas() -> Check:
    choice, provider, gflops = use_fast_blas(), sgemm_provider(), matmul_gflops()
    details = {"provider": provider, "loaded": choice.library, "reason": choice.reason,
               "matmul_gflops": round(gflops, 1)}
    value = f"{Path(provider).name}, {gflops:.1f} GFLOP/s (1024² float32 matmul)"
    reference = sys.platform.startswith("linux") and choice.library is None
    if mlx_backend() != "CPU" or (gflops >= MIN_CPU_GFLOPS and not reference):
        return Check("blas", True, value, None, details)
    hint = (f"MLX uses a slow BLAS ({choice.reason}): {INSTALL_HINT}"
            if choice.library is None else f"matmul is slow although {choice.library} is loaded: "
                                           "is the machine busy?")
    return Check("blas", False, value, hint, details)


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines)}


def check_memory() -> Check:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = _meminfo().get("MemAvailable")
    value = f"{total / 2**30:.1f} GiB" + (f", {available / 2**30:.1f} GiB available" if available else "")
    low = available is not None and available < 2 * 2**30
    return Check("memory", not low, value,
                 "less than 2 GiB free: close other programs before training" if low else None,
                 {"total_bytes": total, "available_bytes": available})


def check_model(role: str, model_id: str) -> Check:
    """A local model directory, or a hub id already in the local cache, resolves."""
    from conch_dna.models.loading import ModelLoadError, check_model_ref

    try:
        check_model_ref(model_id)
    except ModelLoadError as exc:
        return Check(role, False, model_id, f"{exc}: set `{role}` in config.toml to a model directory "
                                            "or an mlx-community id (`conch models import` turns a GGUF into one)")
    path = Path(model_id).expanduser()
    if path.exists():
        return Check(role, True, f"{model_id} ({_origin(path)})")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str):
        return Check(role, True, f"{model_id} (in the hub cache)")
    return Check(role, False, f"{model_id} (not downloaded)",
                 "mlx_lm.load downloads it on first use: run once with network access, "
                 "or point config.toml at a local directory")


def _origin(path: Path) -> str:
    """Where a local model directory came from, as far as it says."""
    try:
        made = json.loads((path / "conch_import.json").read_text())
        return f"imported by conch from {made['source']} as {made['dtype']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a local mlx-lm directory"


def check_pair(config) -> Check:
    """The teacher and the student share token ids (the distiller's rule), checked from their tokenizers."""
    from conch_dna.models.local import pair_check

    try:
        ok, words = pair_check(config.teacher, config.student)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be read is its own check's problem
        return Check("pair", False, "not checked", f"the tokenizers could not be read: {exc}")
    return Check("pair", ok, words if ok else "they do not pair",
                 None if ok else f"{words} (`conch models pair TEACHER STUDENT` checks a pair before you set it)")


def check_disk(home: Path) -> Check:
    probe = home
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    low = free < MIN_FREE_DISK_GB * 2**30
    return Check("disk", not low, f"{free / 2**30:.1f} GiB free at {probe}",
                 f"under {MIN_FREE_DISK_GB:.0f} GiB free: adapters, the teacher cache and checkpoints "
                 "need room" if low else None, {"free_bytes": free})


def check_daemon(state: dict | None) -> Check:
    if state:
        doing = f"training {state['running']['domain']}" if state.get("running") else "idle"
        return Check("daemon", True, f"running (pid {state['pid']}), {doing}")
    return Check("daemon", False, "not running",
                 "start it with `conch daemon run` (foreground) or `conch daemon install` (service)")


def serving_registries(home: Path) -> list[dict]:
    """The figures each live neuron registry of this home last wrote (neurons/<pid>.json)."""
    found = []
    for path in sorted((Path(home) / NEURONS_DIR).glob("*.json")):
        try:
            stats = json.loads(path.read_text())
            os.kill(int(stats["pid"]), 0)  # a registry that died without closing left its file
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append(stats)
    return found


def check_neurons(home: Path, config) -> Check:
    """Not a problem either way: whether agents are being served here, and how fast."""
    live = serving_registries(home)
    if not live:
        return Check("neurons", True, f"no registry serving (batches of up to {config.neurons.max_batch_size})",
                     None, {"registries": []})
    value = "; ".join(f"pid {s['pid']}: {s['running']} running, {s['queued']} queued, {s['tokens_per_s']} tokens/s, "
                      f"time to first token p50 {s['ttft_p50_ms']} ms, batches of up to {s['max_batch_size']}"
                      for s in live)
    return Check("neurons", True, value, None, {"registries": live})


def run_checks(home: Path, config, daemon_state: dict | None) -> list[Check]:
    """Every check, in the order a person reads them."""
    models = [check_model("teacher", config.teacher), check_model("student", config.student)]
    pair = [check_pair(config)] if all(m.ok for m in models) else []
    return [check_backend(), check_blas(), check_memory(), *models, *pair, check_disk(Path(home)),
            check_daemon(daemon_state), check_neurons(Path(home), config)]

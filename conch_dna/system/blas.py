"""An optimized BLAS in front of the reference BLAS that MLX's Linux wheel bundles.

The `mlx-cpu` wheel links netlib's reference BLAS (~6 GFLOP/s for a 1024² float32 matmul on two
cores). Loading OpenBLAS with RTLD_GLOBAL before `mlx.core` is imported puts its `cblas_sgemm` in
the global symbol scope, which the dynamic linker searches before libmlx's own dependencies, so
MLX's matmuls run in OpenBLAS (~65-95 GFLOP/s here) with no re-exec and no LD_PRELOAD. Importing
`conch_dna` does this, which is why every conch process imports it before mlx (ruff's isort
section order enforces it). On macOS MLX uses Metal and Accelerate, and nothing is done.

Set CONCH_BLAS=reference to keep MLX's own BLAS, or CONCH_BLAS=/path/to/libopenblas.so to choose.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ENV_VAR = "CONCH_BLAS"
# Debian/Ubuntu's OpenBLAS (package libopenblas0-pthread) when ldconfig does not list it.
_KNOWN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)
INSTALL_HINT = "apt-get install libopenblas0-pthread (Debian/Ubuntu) or your distribution's OpenBLAS"


@dataclass(frozen=True)
class BlasChoice:
    """What use_fast_blas() did: `library` loaded (or None) and why."""

    library: str | None
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


_choice: BlasChoice | None = None


def find_openblas() -> str | None:
    """Path (or soname) of an OpenBLAS shared library on this machine, or None."""
    for path in _KNOWN_PATHS:
        if Path(path).exists():
            return path
    return ctypes.util.find_library("openblas")


def use_fast_blas() -> BlasChoice:
    """Load OpenBLAS globally before mlx.core is imported (once per process; later calls report)."""
    global _choice
    if _choice is not None:
        return _choice
    wanted = os.environ.get(ENV_VAR, "")
    if not sys.platform.startswith("linux"):
        _choice = BlasChoice(None, f"{sys.platform}: MLX uses the platform's own BLAS")
    elif wanted == "reference":
        _choice = BlasChoice(None, f"{ENV_VAR}=reference")
    elif "mlx.core" in sys.modules:
        _choice = BlasChoice(None, "mlx.core was imported before conch_dna; too late to choose")
    elif not (library := wanted or find_openblas()):
        _choice = BlasChoice(None, f"no OpenBLAS found ({INSTALL_HINT})")
    else:
        try:
            ctypes.CDLL(library, mode=os.RTLD_GLOBAL)
            _choice = BlasChoice(library, "loaded before mlx")
        except OSError as exc:
            _choice = BlasChoice(None, f"could not load {library}: {exc}")
    return _choice


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def sgemm_provider() -> str:
    """The shared library MLX's `cblas_sgemm` resolves to in this process.

    A library in the global scope wins over libmlx's bundled dependency; when none provides the
    symbol there, MLX uses the BLAS bundled with its wheel.
    """
    if not sys.platform.startswith("linux"):
        return "platform (Accelerate/Metal)"
    process = ctypes.CDLL(None)
    try:
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
    except AttributeError:
        return "reference BLAS bundled with mlx"
    info = _DlInfo()
    if not process.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return "unknown"
    return os.path.realpath(info.dli_fname.decode())


def matmul_gflops(n: int = 1024, repeats: int = 8) -> float:
    """Measured float32 n×n matmul speed of MLX in this process, GFLOP/s (median of repeats)."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9

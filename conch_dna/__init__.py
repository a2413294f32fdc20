"""Conch DNA: continuous true knowledge distillation of per-domain LoRA students, on MLX.

Importing the package puts an optimized BLAS in front of MLX on Linux (see conch_dna.system.blas), so it
must come before the first `import mlx`. Agent code's names are here: `from conch_dna import Ego, record`
(loaded on first use, so `import conch_dna` stays cheap).
"""

from conch_dna.system.blas import use_fast_blas

use_fast_blas()

__all__ = ["Ego", "record"]


def __getattr__(name: str):
    if name == "Ego":
        from conch_dna.traces.ego import Ego

        return Ego
    if name == "record":
        from conch_dna.traces.ingest import record

        return record
    raise AttributeError(f"module 'conch_dna' has no attribute {name!r}")

"""Conch DNA: continuous true knowledge distillation of per-domain LoRA students, on MLX.

Importing the package puts an optimized BLAS in front of MLX on Linux (see conch_dna.system.blas), so it
must come before the first `import mlx`.
"""

from conch_dna.system.blas import use_fast_blas

use_fast_blas()

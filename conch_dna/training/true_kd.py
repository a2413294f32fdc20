"""TRUE knowledge distillation of a student's LoRA adapter from a teacher's token distributions.

    python -m conch_dna.training.true_kd --domain thinking --iters 200
    python -m conch_dna.training.true_kd --all --kit          # the project's tiny models

The loss on every answer token is α·KD·T² + (1-α)·CE, where KD compares the student with the
teacher's cached top-k log-probs (plus the tail mass) and CE is on the teacher's own tokens.
With KDConfig.on_policy > 0 (GKD's λ) a share of the answers are the student's own, scored by the
teacher (conch_dna.training.on_policy). The teacher runs only to write targets (cached on disk), and
teacher and student are never resident together.
This module is the engine; it prints nothing (see KDCallback). Its command line is the plain
trainer of the app layer, conch_dna.cli.trainer.
"""

from __future__ import annotations

import runpy

from conch_dna.models.chat import split_prompts, to_chat, to_messages
from conch_dna.training.distiller import (
    DistillOptions,
    DistillResult,
    TrueKnowledgeDistiller,
    get_kd_adapter_path,
)
from conch_dna.training.kd_config import KDConfig
from conch_dna.training.loop import TrainingInterrupted, train_kd
from conch_dna.training.losses import (
    DIVERGENCES,
    align_vocab_sizes,
    compute_ce_loss,
    compute_kd_loss,
    kd_loss,
    log_softmax,
    sparse_kd_loss,
)
from conch_dna.training.step import learning_rate_schedule, make_kd_step, multiplier_tree

__all__ = ["DIVERGENCES", "DistillOptions", "DistillResult", "KDConfig", "TrainingInterrupted",
           "TrueKnowledgeDistiller", "align_vocab_sizes", "compute_ce_loss", "compute_kd_loss", "get_kd_adapter_path",
           "kd_loss", "learning_rate_schedule", "log_softmax", "make_kd_step", "multiplier_tree", "sparse_kd_loss",
           "split_prompts", "to_chat", "to_messages", "train_kd"]


if __name__ == "__main__":  # the plain trainer: its command line belongs to the app layer
    runpy.run_module("conch_dna.cli.trainer", run_name="__main__")

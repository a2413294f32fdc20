"""KDConfig: every setting of a distillation run, defined once with its default, range and help.

The same dataclass is the Python API (`KDConfig(temperature=3.0)`), the `[kd]` table of config.toml
(pydantic validates it as it is, see conch_dna.config) and the plain trainer's flags
(`add_kd_flags` / `kd_config_from_flags`): a default changed here changes it everywhere.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields

from conch_dna.training.losses import DIVERGENCES

from pydantic import ConfigDict, with_config


def _setting(default, help: str, lo=None, hi=None, lo_open: bool = False, flag: str | None = None):
    meta = {"help": help, "flag": flag}
    if lo is not None:
        meta["range"] = (lo, hi, lo_open)
    return field(default=default, metadata=meta)


@with_config(ConfigDict(extra="forbid"))
@dataclass
class KDConfig:
    """Settings of one distillation run. Out-of-range values fail here, naming field and range."""

    temperature: float = _setting(2.0, "softmax temperature T of the KD term", 0.5, 10.0)
    alpha: float = _setting(0.7, "weight of the KD term; 1 - alpha weighs CE on the teacher's tokens", 0.0, 1.0)
    lora_rank: int = _setting(16, "LoRA rank", 4, 64)
    lora_scale: float = _setting(20.0, "LoRA scale (mlx-lm's)", 0.0, 100.0, lo_open=True)
    lora_dropout: float = _setting(0.0, "LoRA dropout", 0.0, 0.9)
    lora_layers: int = _setting(16, "how many of the last blocks get LoRA", 1, 1024)
    learning_rate: float = _setting(1e-4, "peak learning rate (warmup, then cosine decay)", 1e-6, 1e-2)
    batch_size: int = _setting(4, "examples per step", 1, 256)
    num_iters: int = _setting(200, "training steps", 1, 1_000_000, flag="--iters")
    steps_per_report: int = _setting(10, "steps between progress reports", 1, 1_000_000)
    steps_per_save: int = _setting(100, "steps between checkpoints", 1, 1_000_000)
    top_k: int = _setting(64, "teacher log-probs kept per answer token", 1, 1024)
    max_seq_length: int = _setting(2048, "training and evaluation window in tokens", 16, 1_048_576)
    max_answer_tokens: int = _setting(256, "longest answer the teacher writes for a bare prompt", 1, 32768)
    on_policy: float = _setting(0.0, "GKD lambda: share of train prompts the current student answers itself, "
                                     "scored by the teacher (0: the teacher's answers only)", 0.0, 1.0)
    on_policy_rounds: int = _setting(1, "rounds the on-policy prompts are shared out over: the student answers "
                                        "each round's share as it stands when the round starts (1: all before "
                                        "training)", 1, 64)
    sample_temperature: float = _setting(1.0, "temperature of the student's on-policy answers (0: greedy)", 0.0, 2.0)
    sample_max_tokens: int = _setting(128, "longest answer the student writes, for on-policy training and the "
                                           "on-policy held-out KL", 1, 32768)
    divergence: str = _setting("forward_kl", f"KD divergence: {', '.join(DIVERGENCES)}")
    jsd_beta: float = _setting(0.5, "mixture weight of the jsd divergence", 0.0, 1.0, lo_open=True)
    seed: int = _setting(0, "seed of LoRA's initialisation and the batch order")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"KDConfig.{f.name} must be a number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ValueError(f"KDConfig.{f.name} must be an integer, got {value!r}")
            if "range" not in f.metadata:
                continue
            lo, hi, lo_open = f.metadata["range"]
            below = value <= lo if lo_open else value < lo
            if below or value > hi or (isinstance(value, float) and math.isnan(value)):
                bracket = "(" if lo_open else "["
                raise ValueError(f"KDConfig.{f.name} must be in {bracket}{lo}, {hi}], got {value}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"KDConfig.divergence must be one of {', '.join(DIVERGENCES)}, "
                f"got {self.divergence!r}"
            )


def kd_flag(name: str) -> str:
    """The command-line flag of a KDConfig field: --lora-rank for lora_rank (--iters for num_iters)."""
    f = next(f for f in fields(KDConfig) if f.name == name)
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def add_kd_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per KDConfig field, with its default and help."""
    group = parser.add_argument_group("distillation settings (config.toml [kd])")
    types = {"int": int, "float": float, "str": str}
    for f in fields(KDConfig):
        extra = {"choices": DIVERGENCES} if f.name == "divergence" else {}
        group.add_argument(kd_flag(f.name), dest=f.name, type=types[f.type], default=f.default,
                           help=f"{f.metadata['help']} (default: %(default)s)", **extra)


def kd_config_from_flags(args: argparse.Namespace) -> KDConfig:
    """The KDConfig of parsed flags; a ValueError names the flag (--lora-rank), not the field."""
    try:
        return KDConfig(**{f.name: getattr(args, f.name) for f in fields(KDConfig)})
    except ValueError as exc:
        message = str(exc)
        for f in fields(KDConfig):
            message = message.replace(f"KDConfig.{f.name} ", f"{kd_flag(f.name)} ")
        raise ValueError(message) from None

"""KDConfig: every setting of a distillation run, defined once with its default, range and help.

The same dataclass is the Python API (`KDConfig(temperature=3.0)`), the `[kd]` table of config.toml
(pydantic validates it as it is, see conch_dna.settings.config) and the plain trainer's flags
(`add_kd_flags` / `kd_config_from_flags`): a default changed here changes it everywhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from dataclasses import MISSING, dataclass, field, fields

from conch_dna.training.hidden import HIDDEN_LAYER_MAPS, HIDDEN_LOSSES
from conch_dna.training.losses import DIVERGENCES

from pydantic import ConfigDict, with_config


def _setting(default, help: str, lo=None, hi=None, lo_open: bool = False, flag: str | None = None):
    meta = {"help": help, "flag": flag}
    if lo is not None:
        meta["range"] = (lo, hi, lo_open)
    if isinstance(default, (dict, list)):  # a table or list of config.toml: JSON on the command line
        return field(default_factory=lambda: copy.deepcopy(default), metadata={**meta, "json": True})
    return field(default=default, metadata=meta)


def setting_default(f):
    """The default of a KDConfig field, also of one made by a factory."""
    return f.default_factory() if f.default is MISSING else f.default


def _multipliers(value, where: str) -> dict[str, float]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ValueError(f"{where} must be a table of parameter-name pattern = multiplier, got {value!r}")
    for pattern, m in value.items():
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 100:
            raise ValueError(f"{where}[{pattern!r}] must be a number in [0, 100], got {m!r}")
    return {k: float(v) for k, v in value.items()}


def _teachers(value) -> list[dict]:
    if not isinstance(value, list):
        raise ValueError(f"KDConfig.teachers must be a list of {{model, weight}}, got {value!r}")
    teachers = []
    for i, teacher in enumerate(value):
        if not isinstance(teacher, dict) or set(teacher) != {"model", "weight"}:
            raise ValueError(f"KDConfig.teachers[{i}] must be {{model = \"...\", weight = w}}, got {teacher!r}")
        model, weight = teacher["model"], teacher["weight"]
        if not isinstance(model, str) or not model:
            raise ValueError(f"KDConfig.teachers[{i}].model must be a model id or path, got {model!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"KDConfig.teachers[{i}].weight must be a number > 0, got {weight!r}")
        teachers.append({"model": model, "weight": float(weight)})
    if len({t["model"] for t in teachers}) != len(teachers):
        raise ValueError("KDConfig.teachers names a model twice")
    return teachers


def _stages(value) -> list[dict]:
    if not isinstance(value, list):
        raise ValueError(f"KDConfig.stages must be a list of {{steps, multipliers}}, got {value!r}")
    stages = []
    for i, stage in enumerate(value):
        if not isinstance(stage, dict) or set(stage) - {"steps", "multipliers"} or "steps" not in stage:
            raise ValueError(f"KDConfig.stages[{i}] must be {{steps = N, multipliers = {{...}}}}, got {stage!r}")
        steps = stage["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"KDConfig.stages[{i}].steps must be an integer >= 1, got {steps!r}")
        stages.append({"steps": steps,
                       "multipliers": _multipliers(stage.get("multipliers", {}), f"KDConfig.stages[{i}].multipliers")})
    return stages


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
    # 2e-4: on prompts kept apart, 60 steps, 1e-4 and 4e-4 left a teacher-forced KL 12% and 16% higher
    # (docs/measurements/defaults.md; other step counts were not swept)
    learning_rate: float = _setting(2e-4, "peak learning rate (warmup, then cosine decay)", 1e-6, 1e-2)
    batch_size: int = _setting(4, "examples per step", 1, 256)
    num_iters: int = _setting(200, "training steps", 1, 1_000_000, flag="--iters")
    steps_per_report: int = _setting(10, "steps between progress reports", 1, 1_000_000)
    steps_per_save: int = _setting(100, "steps between checkpoints", 1, 1_000_000)
    top_k: int = _setting(64, "teacher log-probs kept per answer token", 1, 1024)
    max_seq_length: int = _setting(2048, "training and evaluation window in tokens", 16, 1_048_576)
    max_answer_tokens: int = _setting(256, "longest answer the teacher writes for a bare prompt", 1, 32768)
    # 0: on prompts kept apart from tuning, on-policy training made the real pair's student loop and raised its
    # teacher-forced KL 18% (bench/defaults.py, docs/measurements/defaults.md)
    on_policy: float = _setting(0.0, "GKD lambda: share of train prompts the current student answers itself, "
                                     "scored by the teacher (0: the teacher's answers only)", 0.0, 1.0)
    on_policy_rounds: int = _setting(8, "rounds the on-policy prompts are shared out over: the student answers "
                                        "each round's share as it stands when the round starts (1: all before "
                                        "training)", 1, 64)
    sample_temperature: float = _setting(0.0, "temperature of the student's on-policy answers (0: greedy, as the "
                                              "on-policy held-out KL answers)", 0.0, 2.0)
    sample_max_tokens: int = _setting(128, "longest answer the student writes, for on-policy training and the "
                                           "on-policy held-out KL", 1, 32768)
    divergence: str = _setting("forward_kl", f"KD divergence: {', '.join(DIVERGENCES)}")
    jsd_beta: float = _setting(0.5, "mixture weight of the jsd divergence", 0.0, 1.0, lo_open=True)
    seed: int = _setting(0, "seed of LoRA's initialisation and the batch order")
    # 0.1 with the layer map by depth: the lowest teacher-forced KL and repetition of the kept-apart table
    # (docs/measurements/defaults.md)
    hidden_weight: float = _setting(0.1, "weight of the hidden-state (layer-wise) loss; 0: logits only", 0.0, 100.0)
    hidden_loss: str = _setting("mse", f"hidden-state loss: {', '.join(HIDDEN_LOSSES)} (mse relative to the teacher's)")
    hidden_layers: dict[str, int] = _setting(
        {}, "student layer -> teacher layer of the hidden-state loss, e.g. {\"3\": 7} (empty: 4 student "
            "layers evenly spaced up to the last, each with the teacher's at the same depth)")
    hidden_layer_map: str = _setting(
        "depth", "the default hidden-state layer map pairs each student block with the teacher's at the same "
                 "relative depth (depth) or with the teacher block it was cut from, where the student records its "
                 "cut (origin; conch models pair's students do); hidden_layers, when set, rules")
    lr_multipliers: dict[str, float] = _setting(
        {}, "learning-rate multiplier by trainable parameter name pattern (fnmatch, e.g. "
            "'model.layers.0.*'; the last matching pattern wins; 0 freezes)")
    teachers: list[dict] = _setting(
        [], "several teachers: [{model, weight}]; their top-k are mixed in probability space, each one's "
            "tail kept; the first writes the answers a prompt lacks (empty: the run's one teacher)")
    stages: list[dict] = _setting(
        [], "training in stages, in order: [{steps, multipliers}]; a stage's patterns come after "
            "lr_multipliers'; after the last stage, lr_multipliers alone")

    def multipliers_at(self, step: int) -> dict[str, float]:
        """The learning-rate multiplier patterns in force at a step (1-based), in matching order."""
        start = 0
        for stage in self.stages:
            if step <= start + stage["steps"]:
                return {**self.lr_multipliers, **stage["multipliers"]}
            start += stage["steps"]
        return self.lr_multipliers

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
        self.lr_multipliers = _multipliers(self.lr_multipliers, "KDConfig.lr_multipliers")
        self.stages = _stages(self.stages)
        self.teachers = _teachers(self.teachers)
        if self.hidden_layer_map not in HIDDEN_LAYER_MAPS:
            raise ValueError(f"KDConfig.hidden_layer_map must be one of {', '.join(HIDDEN_LAYER_MAPS)}, "
                             f"got {self.hidden_layer_map!r}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"KDConfig.hidden_loss must be one of {', '.join(HIDDEN_LOSSES)}, "
                             f"got {self.hidden_loss!r}")
        if not isinstance(self.hidden_layers, dict) or not all(
                isinstance(k, str) and k.isdigit() and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in self.hidden_layers.items()):
            raise ValueError(f'KDConfig.hidden_layers must map student layer numbers to teacher layer numbers, '
                             f'e.g. {{"3": 7}}, got {self.hidden_layers!r}')
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"KDConfig.divergence must be one of {', '.join(DIVERGENCES)}, "
                f"got {self.divergence!r}"
            )


def changed_settings(config: KDConfig) -> dict:
    """The settings of `config` that differ from the defaults (what a run's record shows)."""
    return {f.name: getattr(config, f.name) for f in fields(KDConfig)
            if getattr(config, f.name) != setting_default(f)}


def kd_flag(name: str) -> str:
    """The command-line flag of a KDConfig field: --lora-rank for lora_rank (--iters for num_iters)."""
    f = next(f for f in fields(KDConfig) if f.name == name)
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def add_kd_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per KDConfig field, with its default and help."""
    group = parser.add_argument_group("distillation settings (config.toml [kd])")
    types = {"int": int, "float": float, "str": str}
    for f in fields(KDConfig):
        choices = {"divergence": DIVERGENCES, "hidden_loss": HIDDEN_LOSSES, "hidden_layer_map": HIDDEN_LAYER_MAPS}
        extra = {"choices": choices[f.name]} if f.name in choices else {}
        is_json = f.metadata.get("json", False)
        group.add_argument(kd_flag(f.name), dest=f.name, type=_json_flag if is_json else types[f.type],
                           default=setting_default(f),
                           help=f"{f.metadata['help']} ({'JSON; ' if is_json else ''}default: %(default)s)", **extra)


def _json_flag(text: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


def kd_config_from_flags(args: argparse.Namespace) -> KDConfig:
    """The KDConfig of parsed flags; a ValueError names the flag (--lora-rank), not the field."""
    try:
        return KDConfig(**{f.name: getattr(args, f.name) for f in fields(KDConfig)})
    except ValueError as exc:
        message = str(exc)
        for f in fields(KDConfig):
            message = re.sub(rf"KDConfig\.{f.name}(?=[ \[.])", kd_flag(f.name), message)
        raise ValueError(message) from None

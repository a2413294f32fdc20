"""$CONCH_HOME/config.toml, validated: an unknown key or a bad value is an error naming the key.

    teacher = "mlx-community/Qwen2.5-7B-Instruct-4bit"
    student = "mlx-community/Qwen2.5-3B-Instruct-4bit"
    retrain_threshold = 32          # new train prompts of a domain that trigger a retrain
    check_minutes = 10

    [kd]
    temperature = 2.0
    num_iters = 200

    [neurons]
    max_batch_size = 8              # calls decoded together by the neuron registry

    [domain.debug]                  # per-domain overrides
    retrain_threshold = 16
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from conch_dna.domains import DOMAINS, validate_domain_name
from conch_dna.models import DEFAULT_STUDENT, DEFAULT_TEACHER
from conch_dna.training.kd_config import KDConfig

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """config.toml is unreadable or has an unknown key or a bad value; the message names it."""


class DomainSettings(BaseModel):
    """Per-domain overrides of the top-level thresholds."""

    model_config = ConfigDict(extra="forbid")
    retrain_threshold: int | None = Field(default=None, ge=1)
    num_iters: int | None = Field(default=None, ge=1)
    min_heldout: int | None = Field(default=None, ge=0)


class NeuronSettings(BaseModel):
    """How the neuron registry batches calls ([neurons] in config.toml)."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(default=8, ge=1, le=256)  # rows decoded together; later calls queue
    prefill_step_size: int = Field(default=512, ge=1)  # prompt tokens prefilled between decode steps


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str = DEFAULT_TEACHER
    student: str = DEFAULT_STUDENT
    domains: list[str] = Field(default_factory=lambda: list(DOMAINS))
    heldout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    check_minutes: float = Field(default=10.0, gt=0)
    retrain_threshold: int = Field(default=32, ge=1)
    replay_count: int = Field(default=32, ge=0)  # older train traces mixed into each retrain
    # a backlog (a long pause, a bulk import) is trained in runs of at most this many new traces
    max_traces_per_run: int = Field(default=2000, ge=1)
    promote_margin: float = Field(default=0.02, ge=0.0, lt=1.0)  # relative held-out KL gain
    max_agreement_drop: float = Field(default=0.01, ge=0.0, le=1.0)
    min_heldout: int = Field(default=8, ge=0)
    train_on_battery: bool = False
    keep_versions: int = Field(default=5, ge=1)  # per domain, besides the current and pinned ones
    teacher_cache_max_mb: float = Field(default=4096, gt=0)  # least recently used targets go first
    # a domain whose runs fail is retried after check_minutes, then twice as long each time, up to this
    max_backoff_minutes: float = Field(default=24 * 60, gt=0)
    failure_limit: int = Field(default=3, ge=1)  # failed runs in a row on one batch before it is set aside
    neurons: NeuronSettings = Field(default_factory=NeuronSettings)
    kd: KDConfig = Field(default_factory=KDConfig)  # validated by pydantic, ranges by KDConfig itself
    domain: dict[str, DomainSettings] = Field(default_factory=dict)

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        for name in v:
            validate_domain_name(name)
        if len(set(v)) != len(v) or not v:
            raise ValueError("domains must be a non-empty list of distinct names")
        return v

    def threshold(self, domain: str) -> int:
        o = self.domain.get(domain)
        return o.retrain_threshold if o and o.retrain_threshold else self.retrain_threshold

    def iters(self, domain: str) -> int:
        o = self.domain.get(domain)
        return o.num_iters if o and o.num_iters else self.kd.num_iters

    def kd_for(self, domain: str) -> KDConfig:
        """The run settings of a domain: [kd] with the domain's num_iters."""
        return replace(self.kd, num_iters=self.iters(domain))

    def with_iters(self, domain: str, iters: int | None) -> Config:
        """This config with the domain's num_iters set to `iters` (None: unchanged), e.g. --iters."""
        if iters is None:
            return self
        override = (self.domain.get(domain) or DomainSettings()).model_copy(update={"num_iters": iters})
        return self.model_copy(update={"domain": {**self.domain, domain: override}})

    def heldout_minimum(self, domain: str) -> int:
        o = self.domain.get(domain)
        return o.min_heldout if o and o.min_heldout is not None else self.min_heldout


def parse_config(text: str, source: str = "config.toml") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        key = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown key"
        raise ConfigError(f"{source}: {key}: {msg.replace('KDConfig.', 'kd.')}") from None
    unknown = [d for d in config.domain if d not in config.domains]
    if unknown:
        raise ConfigError(f"{source}: domain.{unknown[0]}: not one of the configured domains")
    return config


def load_config(home: str | Path) -> Config:
    """The home's config.toml, or the defaults when there is none."""
    path = Path(home) / "config.toml"
    if not path.exists():
        return Config()
    return parse_config(path.read_text(), str(path))

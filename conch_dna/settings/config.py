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

    serve = true                    # the daemon also runs `conch serve` (put it above the tables)
    [server]
    port = 8321

    [ego]                           # where "ego/<domain>" calls of `conch serve` go
    upstream_url = "http://127.0.0.1:8080/v1"

    [domain.debug]                  # per-domain overrides
    retrain_threshold = 16
"""

from __future__ import annotations

import sys
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Literal

from conch_dna.models.loading import DEFAULT_STUDENT, DEFAULT_TEACHER
from conch_dna.system.domains import DOMAINS, validate_domain_name
from conch_dna.training.kd_config import KDConfig

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """config.toml is unreadable or has an unknown key or a bad value; the message names it."""


class GateMetric(str, Enum):
    """Which held-out metrics the promotion gate compares."""

    TEACHER_FORCED = "teacher_forced"  # the student read along the teacher's answers
    ON_POLICY = "on_policy"  # the version's own greedy answers, scored by the teacher: what a user gets
    # the teacher-forced KL must fall by the margin and the on-policy KL may not rise by more than it: for runs
    # that train on-policy ([kd] on_policy > 0), so that they cannot win one by losing the other
    BOTH = "both"
    TOOL_CALLS = "tool_calls"  # the share of held-out tool calls answered with the teacher's call (then KL)


class DomainSettings(BaseModel):
    """Per-domain overrides of the top-level thresholds."""

    model_config = ConfigDict(extra="forbid")
    retrain_threshold: int | None = Field(
        default=None, ge=1,
        description="new train traces of a domain that start a retrain")
    num_iters: int | None = Field(default=None, ge=1,
                                  description="KD steps of this domain's runs (default: [kd] num_iters)")
    min_heldout: int | None = Field(default=None, ge=0,
                                    description="held-out traces a run needs before its candidate may be promoted "
                                                "(fewer: --force)")


class NeuronSettings(BaseModel):
    """How the neuron registry batches calls ([neurons] in config.toml)."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(default=8, ge=1, le=256, description="rows decoded together; later calls queue")
    prefill_step_size: int = Field(default=512, ge=1, description="prompt tokens prefilled between decode steps")


class ServerSettings(BaseModel):
    """`conch serve`, the OpenAI-compatible API ([server] in config.toml)."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field(default="127.0.0.1", description="another host needs the bearer token")
    port: int = Field(default=8321, ge=1, le=65535, description="the port conch serve listens on")
    token_env: str = Field(default="CONCH_SERVE_TOKEN",
                           description="the variable holding the bearer token; set, it is required")
    default_max_tokens: int = Field(default=512, ge=1, description="a request that names no max_tokens")
    max_tokens: int = Field(default=4096, ge=1, description="the most a request may ask for")
    max_request_kb: int = Field(default=1024, ge=1, description="a larger request body is refused (413)")
    accept_traces: bool = Field(default=True,
                                description="POST /v1/traces: agents elsewhere send their EGO traces (JSONL) to this "
                                            "home")
    max_traces_mb: int = Field(default=64, ge=1, description="a larger POST of traces is refused (413)")
    max_trace_lines: int = Field(default=20000, ge=1,
                                 description="a POST of more lines is refused (413): send it in parts")
    traces_mb_per_hour: float = Field(default=512.0, gt=0, description="each client's POSTed traces; past it, 429")
    min_free_disk_mb: int = Field(default=1024, ge=0,
                                  description="a POST of traces is refused (507) with less free in the home")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="names this server answers to besides loopback and its bound address (a request for any other Host "
                    "is refused: DNS rebinding)")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="web origins whose pages may call this server (a request with any other Origin is refused)")
    max_connections: int = Field(default=256, ge=1, le=65536,
                                 description="open at once; one more closes the slowest waiting")
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600, description="for a request's headers, once connected")
    body_timeout_s: float = Field(default=120.0, gt=0, le=86400, description="for a request's whole body")


class DistributedSettings(BaseModel):
    """Retrains that run data-parallel over several processes or Macs ([distributed] in config.toml),
    launched by mlx.launch; with neither `hostfile` nor `local_ranks` a retrain runs in one process."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["ring", "mpi", "jaccl", "jaccl-ring"] = Field(default="ring", description="mlx.launch's backend")
    hostfile: str | None = Field(default=None,
                                 description="mlx.launch's host file (JSON: [{\"ssh\": \"mac2.local\", \"ips\": "
                                             "[\"10.0.0.2\"]}, ...])")
    local_ranks: int = Field(default=0, ge=0, le=64,
                             description="or this many processes on this machine (to try it out)")
    timeout_s: float = Field(default=300.0, gt=0, description="a collective slower than this fails the run")

    @property
    def enabled(self) -> bool:
        return bool(self.hostfile) or self.local_ranks > 1


class EgoSettings(BaseModel):
    """Where `conch serve` sends "ego/<domain>" calls ([ego] in config.toml): an upstream
    OpenAI-compatible server, or (no upstream_url) the config's teacher in the server's process."""

    model_config = ConfigDict(extra="forbid")
    upstream_url: str | None = Field(default=None, description="e.g. mlx_lm.server's \"http://127.0.0.1:8080/v1\"")
    upstream_model: str | None = Field(
        default=None,
        description="the name the upstream knows the teacher by; default: teacher")
    api_key_env: str | None = Field(default=None,
                                    description="the variable holding the upstream's API key, if it wants one")
    top_logprobs: int = Field(default=10, ge=0, le=20, description="asked of the upstream for the trace's top-k")
    timeout_s: float = Field(default=600.0, gt=0, description="how long an upstream answer may take")
    aliases: dict[str, str] = Field(default_factory=dict, description="other model names that mean \"ego/<domain>\"")
    max_answer_kb: int = Field(default=4096, ge=1,
                               description="an upstream answer longer than this is cut off, not recorded")

    @field_validator("upstream_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8080/v1")
        return v.rstrip("/") if v else v


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str = Field(default=DEFAULT_TEACHER,
                         description="the teacher: a local mlx-lm folder, a hub id, or an imported GGUF")
    student: str = Field(default=DEFAULT_STUDENT, description="the student base the LoRA adapters are trained on")
    domains: list[str] = Field(default_factory=lambda: list(DOMAINS),
                               description="the domains traces may have, each with its own neuron")
    heldout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0,
                                    description="share of each domain's traces kept apart for the gate (by a hash of "
                                                "the prompt)")
    check_minutes: float = Field(default=10.0, gt=0, description="how often the daemon looks for domains to retrain")
    retrain_threshold: int = Field(default=32, ge=1, description="new train traces of a domain that start a retrain")
    replay_count: int = Field(default=32, ge=0, description="older train traces mixed into each retrain")
    max_quarantine_mb: float = Field(
        default=64.0, gt=0,
        description="the quarantine (bad lines from the inbox, record() and POST /v1/traces) keeps this much, oldest "
                    "forgotten first")
    max_traces_per_run: int = Field(default=2000, ge=1,
                                    description="a backlog (a long pause, a bulk import) is trained in runs of at most "
                                                "this many new traces")
    max_heldout_per_run: int = Field(default=1000, ge=1, description="more held-out traces: each run measures a sample")
    promote_margin: float = Field(default=0.02, ge=0.0, lt=1.0, description="relative held-out KL gain")
    # teacher-forced: what the default objective ([kd] on_policy = 0) trains for; the on-policy KL falls as a student
    # loops (r = -0.72 against repeated 4-grams over docs/measurements/defaults.md's runs), so alone it is no measure
    gate_metric: GateMetric = Field(default=GateMetric.TEACHER_FORCED, description="the held-out KL the gate compares")
    measure_on_policy: bool = Field(default=True,
                                    description="the on-policy held-out KL costs teacher passes over each version's "
                                                "answers: false on a machine that trains on imported teacher targets "
                                                "without the teacher")
    max_agreement_drop: float = Field(
        default=0.01, ge=0.0, le=1.0,
        description="how far the held-out top-1 agreement with the teacher may fall for a promotion")
    max_tool_parse_drop: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="how far the share of held-out tool calls whose answer parses may fall (1: not checked)")
    max_format_drop: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="how far the share of held-out answers asked in a response_format that validate against it, "
                    "answered free, may fall (1: not checked)")
    # auto/<domain>: a version's own answer is served where its confidence clears the threshold fitted at its
    # gate, so that the held-out answers it would accept stay within this teacher-scored KL per token
    auto_max_kl: float = Field(default=1.0, gt=0.0,
                               description="auto/<domain>: the mean teacher-scored KL per token (nats) the answers "
                                           "a version accepts may have on its held-out prompts")
    auto_max_repeat: float = Field(default=0.3, ge=0.0, le=1.0,
                                   description="auto/<domain>: an answer whose share of repeated token 4-grams is "
                                               "over this is never accepted (the teacher scores a loop well)")
    auto_unverified: Literal["serve", "refuse"] = Field(
        default="serve",
        description="auto/<domain> when a deferred call's teacher cannot answer (none loads, it fails, or it takes "
                    "over auto_teacher_timeout_s): serve the student's answer marked x-conch-unverified, or refuse "
                    "the call with a 502 and the reason")
    auto_teacher_timeout_s: float = Field(default=120.0, gt=0.0,
                                          description="auto/<domain>: how long a deferred call waits for the "
                                                      "teacher's answer to begin")
    max_repeat_rise: float = Field(
        default=0.2, ge=0.0, le=1.0,
        description="how far the share of repeated token 4-grams in the held-out greedy answers may rise over the "
                    "current version's (1: not checked)")
    min_distinct_ratio: float = Field(
        default=0.7, ge=0.0, le=1.0,
        description="the candidate's share of distinct token bigrams in those answers must be at least this "
                    "times the current version's (0: not checked)")
    max_unended_rise: float = Field(
        default=0.25, ge=0.0, le=1.0,
        description="how far the share of those answers that run to their token budget, never ending, may "
                    "rise (1: not checked)")
    min_entropy_ratio: float = Field(
        default=0.6, ge=0.0, le=1.0,
        description="the mean token entropy of the candidate's held-out greedy answers, against the teacher's over "
                    "its own answers, may not fall under this and under the current version's (0: not checked)")
    max_length_ratio: float = Field(
        default=3.0, ge=1.0,
        description="the mean length of those answers against the teacher's may not leave 1/x to x and get further "
                    "from 1 than the current version's (inf: not checked)")
    min_heldout: int = Field(default=8, ge=0,
                             description="held-out traces a run needs before its candidate may be promoted (fewer: "
                                         "--force)")
    train_on_battery: bool = Field(default=False,
                                   description="retrain on battery power too (else the daemon waits for AC)")
    keep_versions: int = Field(default=5, ge=1, description="per domain, besides the current and pinned ones")
    teacher_cache_max_mb: float = Field(default=4096, gt=0, description="least recently used targets go first")
    max_backoff_minutes: float = Field(
        default=24 * 60, gt=0,
        description="a domain whose runs fail is retried after check_minutes, then twice as long each time, up to this")
    failure_limit: int = Field(default=3, ge=1, description="failed runs in a row on one batch before it is set aside")
    neurons: NeuronSettings = Field(default_factory=NeuronSettings,
                                    description="[neurons]: how the registry batches calls")
    serve: bool = Field(default=False, description="the daemon runs `conch serve` too")
    server: ServerSettings = Field(default_factory=ServerSettings, description="[server]: conch serve")
    ego: EgoSettings = Field(default_factory=EgoSettings, description="[ego]: where ego/<domain> calls go")
    distributed: DistributedSettings = Field(
        default_factory=DistributedSettings,
        description="[distributed]: data-parallel retrains")
    kd: KDConfig = Field(default_factory=KDConfig,
                         description="[kd]: the settings of every run (KDConfig, below); validated by pydantic, ranges "
                                     "by KDConfig")
    domain: dict[str, DomainSettings] = Field(default_factory=dict, description="[domain.<name>]: per-domain overrides")

    @model_validator(mode="after")
    def _measures_need_the_teacher(self) -> Config:
        if self.gate_metric is GateMetric.ON_POLICY and not self.measure_on_policy:
            raise ValueError('gate_metric = "on_policy" needs measure_on_policy = true')
        if self.kd.on_policy > 0 and not self.measure_on_policy:
            # a machine without the teacher cannot score the student's own answers either
            raise ValueError(f"[kd] on_policy = {self.kd.on_policy:g} needs measure_on_policy = true: the teacher "
                             "scores the student's own answers; set [kd] on_policy = 0 to train on imported "
                             "targets alone")
        return self

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
        where = f"{key}: " if key else ""  # a rule over several keys names them itself
        raise ConfigError(f"{source}: {where}{msg.replace('KDConfig.', 'kd.')}") from None
    unknown = [d for d in config.domain if d not in config.domains]
    if unknown:
        raise ConfigError(f"{source}: domain.{unknown[0]}: not one of the configured domains")
    aliased = [(name, d) for name, d in config.ego.aliases.items() if d not in config.domains]
    if aliased:
        raise ConfigError(f"{source}: ego.aliases.{aliased[0][0]}: {aliased[0][1]!r} is not one of the "
                          f"configured domains")
    return config


def load_config(home: str | Path) -> Config:
    """The home's config.toml, or the defaults when there is none."""
    path = Path(home) / "config.toml"
    if not path.exists():
        return Config()
    return parse_config(path.read_text(), str(path))

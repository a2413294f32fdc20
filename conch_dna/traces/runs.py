"""Training runs: the states a run goes through and the record the store keeps of each."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import Enum


class RunStatus(str, Enum):
    """Where a retrain cycle ended (RUNNING while it goes); stored as its value."""

    RUNNING = "running"
    PROMOTED = "promoted"  # the candidate passed the gate and is the current version
    REJECTED = "rejected"  # the candidate was measured and was not better
    SKIPPED = "skipped"  # nothing to train, or another cycle of the domain held its lock
    INTERRUPTED = "interrupted"  # stopped between steps (SIGTERM); the next run resumes its checkpoint
    FAILED = "failed"  # an error; the current version is untouched

    def __str__(self) -> str:
        return self.value


# a failed run's decision when what failed was not its traces (a model that does not load, a full disk):
# it backs the domain off like any failure, but never counts towards setting the traces aside
NOT_THE_TRACES = "failed: not the traces"


@dataclass
class RunRecord:
    """One row of the store's `runs` table: what a retrain cycle took in, measured and decided."""

    id: int
    domain: str
    status: RunStatus
    started_at: float
    finished_at: float | None = None
    upto_rowid: int | None = None  # the last trace the run could see
    new_traces: int | None = None
    replay_traces: int | None = None
    heldout_traces: int | None = None
    iters: int | None = None
    current_metrics: dict | None = None  # held-out metrics of the version the candidate was measured against
    candidate_metrics: dict | None = None
    decision: str | None = None
    reason: str | None = None
    version: str | None = None  # the version current when the run ended
    history: list[dict] | None = None  # the training reports, one per steps_per_report
    pid: int | None = None
    samples_generated: int | None = None  # train prompts the student answered itself (on-policy)
    phase_seconds: dict | None = None  # seconds of each phase: sample, teacher, train, evaluate
    kd_settings: dict | None = None  # the run's KDConfig settings that differ from the defaults

    def __post_init__(self):
        self.status = RunStatus(self.status)

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def kl_change(self, on_policy: bool = False) -> str:
        """Held-out KL of the current version -> the candidate, teacher-forced or on-policy; "-" if unmeasured."""
        current, candidate = self.current_metrics, self.candidate_metrics
        if on_policy:
            current, candidate = (current or {}).get("on_policy"), (candidate or {}).get("on_policy")
        return f"{current['kl']:.4f} -> {candidate['kl']:.4f}" if current and candidate else "-"

    def tool_change(self) -> str:
        """Held-out tool calls of the current version -> the candidate: the share that give the
        teacher's call (name and arguments), and the share that parse; "-" where none were measured."""
        current, candidate = ((m or {}).get("tool_calls") for m in (self.current_metrics, self.candidate_metrics))
        return tool_cells(current, candidate)

    def format_change(self) -> str:
        """Held-out answers asked in a response_format that validate, current version -> candidate, answered
        free (and held); "-" where none were measured."""
        current, candidate = ((m or {}).get("formats") for m in (self.current_metrics, self.candidate_metrics))
        return f"{format_words(current)} -> {format_words(candidate)}" if current and candidate else "-"

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status.value}


def tool_words(metrics: dict | None) -> str:
    """A version's held-out tool calls in a few characters: right (parse)."""
    return f"{metrics['arguments']:.0%} ({metrics['parsed']:.0%})" if metrics else "-"


def format_words(metrics: dict | None) -> str:
    """A version's held-out answers asked in a form that validate: free (held)."""
    return f"{metrics['valid']:.0%} ({metrics['valid_held']:.0%})" if metrics else "-"


def tool_cells(current: dict | None, candidate: dict | None) -> str:
    return f"{tool_words(current)} -> {tool_words(candidate)}" if current and candidate else "-"

"""One retrain cycle of one domain: select traces, distil, validate against the current adapter,
promote or reject, and record the run. The daemon and `conch kd retrain` both call retrain_domain."""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from conch_dna.lifecycle.acceptance import fit_acceptance, write_acceptance
from conch_dna.lifecycle.failures import set_aside_if_stuck
from conch_dna.lifecycle.gate import decide
from conch_dna.lifecycle.plan import decode_plan, encode_plan
from conch_dna.models.loading import ModelLoadError, VocabMismatchError
from conch_dna.models.versions import (
    DomainBusy,
    ManifestError,
    StaleCandidate,
    current_adapter_path,
    current_version,
    discard,
    domain_dir,
    domain_lock,
    promote,
    prune_versions,
)
from conch_dna.settings.config import Config, load_config
from conch_dna.system import distributed
from conch_dna.system.domains import check_domain
from conch_dna.system.fsutil import atomic_write_json
from conch_dna.system.home import TEACHER_CACHE_DIR
from conch_dna.traces.runs import NOT_THE_TRACES, RunStatus
from conch_dna.traces.store import TraceStore
from conch_dna.training.callbacks import KDCallback
from conch_dna.training.kd_config import changed_settings
from conch_dna.training.targets.teacher import TeacherCache
from conch_dna.training.true_kd import DistillOptions, DistillResult, TrainingInterrupted, TrueKnowledgeDistiller

RESUME_FILE = ".resume.json"
RESUME_DIR = ".resume"


@dataclass
class CycleResult:
    run_id: int | None
    domain: str
    status: RunStatus
    reason: str
    version: str | None = None
    current_metrics: dict | None = None
    candidate_metrics: dict | None = None


def _with_established(metrics: dict | None, established: dict | None, side: str) -> dict | None:
    """A run's metrics, plus those on the held-out traces the current version was validated on."""
    if metrics is None or not established:
        return metrics
    return {**metrics, "established": established[side]}


def pending(store: TraceStore, domain: str) -> int:
    """New train traces of a domain since its last completed run."""
    return store.counts(domain).new_train


@dataclass
class Selection:
    """The traces one run of a domain learns from and is measured on."""

    mark: int  # the last trace the previous completed run consumed
    upto: int  # the last trace this run may see (a resumed run keeps its first run's)
    new: list[dict]
    replay: list[dict]  # older train traces mixed in, so a domain does not forget
    held: list[dict]
    resume: tuple[Path, int] | None = None  # (checkpoint, step) of an interrupted run of these traces

    @property
    def established(self) -> list[dict]:
        """Held-out traces the current version was already validated on."""
        return [t for t in self.held if t["rowid"] <= self.mark]


class _Skip(Exception):
    """Nothing to train: the reason, in words."""


def retrain_domain(home: str | Path, domain: str, config: Config | None = None, force: bool = False,
                   callbacks: KDCallback | None = None) -> CycleResult:
    """One retrain cycle of `domain`: select → train → gate → record.

    `config` defaults to the home's config.toml (`Config.with_iters` sets a run's steps). `force`
    trains without new traces and promotes past a too small held-out set. `callbacks` hears the
    engine's progress; its should_stop() turning true (a SIGTERM) interrupts the cycle: the
    checkpoint is kept and the next cycle of the domain resumes from it with the same traces.
    One cycle of a domain at a time: while another holds the domain's lock this one is skipped.
    Returns a CycleResult whose status is a RunStatus; raises UnknownDomainError for a domain
    the config does not have. Errors of a run are recorded and returned as FAILED, not raised.
    """
    home = Path(home)
    config = config or load_config(home)
    check_domain(domain, config.domains)
    if not distributed.is_leader():  # data-parallel: rank 0 selects, gates and records; the others train along
        return _follow(home, domain, callbacks or KDCallback())
    distributed.configure(config.distributed.timeout_s)
    try:
        with domain_lock(home, domain):
            return _Cycle(home, domain, config, force, callbacks or KDCallback()).run()
    except DomainBusy as exc:
        _tell_followers(None)
        return CycleResult(None, domain, RunStatus.SKIPPED, str(exc))


def _tell_followers(plan: dict | None) -> None:
    """Rank 0's plan of the run (what the other ranks train on and how), or None (sent as nothing): no run."""
    if distributed.size() > 1:
        distributed.broadcast_bytes(encode_plan(plan) if plan is not None else b"", "the run's plan")


def _follow(home: Path, domain: str, callbacks: KDCallback) -> CycleResult:
    """A rank other than 0: train on rank 0's plan, write nothing (rank 0 alone keeps the run)."""
    import tempfile

    from conch_dna.training.kd_config import KDConfig

    blob = distributed.broadcast_bytes(b"", "the run's plan")
    if not blob:
        return CycleResult(None, domain, RunStatus.SKIPPED, "rank 0 runs no retrain")
    plan = decode_plan(blob)
    distributed.configure(plan["timeout_s"])
    with tempfile.TemporaryDirectory(prefix="conch-rank-") as tmp:
        distiller = TrueKnowledgeDistiller(plan["teacher"], plan["student"], KDConfig(**plan["kd"]), output_dir=tmp,
                                           cache_dir=home / TEACHER_CACHE_DIR, callbacks=callbacks)
        resume = (Path(plan["resume"][0]), plan["resume"][1]) if plan["resume"] else None
        options = DistillOptions(adapter_dir=Path(tmp) / "adapter", resume=resume,
                                 heldout_groups=plan["groups"], measure_on_policy=plan["measure_on_policy"])
        try:
            distiller.distill_domain(domain, plan["train"], plan["held"] or None, options)
        except TrainingInterrupted as stop:  # told to stop with rank 0, which keeps the checkpoint
            return CycleResult(None, domain, RunStatus.INTERRUPTED, str(stop))
        except distributed.RankFailure as exc:
            return CycleResult(None, domain, RunStatus.FAILED, str(exc))
    return CycleResult(None, domain, RunStatus.RUNNING, f"trained as rank {distributed.rank()}; rank 0 records the run")


# what fails a run without being the traces' fault: the next run waits longer, but their data is not set aside
ENVIRONMENT_ERRORS = (ModelLoadError, VocabMismatchError, OSError, MemoryError)


class _Cycle:
    """retrain_domain's steps, sharing the domain, its store and its folder."""

    def __init__(self, home: Path, domain: str, config: Config, force: bool, callbacks: KDCallback):
        self.home, self.domain, self.config, self.force, self.callbacks = home, domain, config, force, callbacks
        self.store = TraceStore.for_home(home, config)
        self.kd = config.kd_for(domain)
        self.folder = domain_dir(home, domain)

    def run(self) -> CycleResult:
        try:
            picked = self.select()
        except _Skip as skip:
            _tell_followers(None)
            return CycleResult(None, self.domain, RunStatus.SKIPPED, str(skip))
        run_id = self.store.start_run(self.domain, upto_rowid=picked.upto, new_traces=len(picked.new),
                                      replay_traces=len(picked.replay), heldout_traces=len(picked.held),
                                      iters=self.kd.num_iters)
        candidate = self.folder / f".candidate-{run_id}"
        distributed.configure(self.config.distributed.timeout_s,
                              lambda reason: self.rank_failed(run_id, picked, candidate, reason))
        try:
            measured_against = current_version(self.home, self.domain)
            result = self.train(picked, candidate)
            scores = (result.heldout_after or {}).pop("answer_scores", None)  # too many to keep in the run's row
            if scores:  # what auto/<domain> will accept from this version, fitted on its own held-out answers
                ended = (result.heldout_after.get("answers") or {}).get("teacher_ended")
                result.heldout_after["acceptance"] = rule = fit_acceptance(scores, self.config, ended)
                write_acceptance(candidate, rule)
            promoted, reason = self.gate(picked, result)
            version, reason = self.publish(candidate, measured_against, reason) if promoted else (None, reason)
            if version is None:
                discard(candidate)
            return self.record(run_id, picked, result, version, reason)
        except TrainingInterrupted as stop:
            return self.interrupted(run_id, picked, candidate, stop)
        except distributed.RankFailure as exc:
            return self.rank_failed(run_id, picked, candidate, str(exc))
        except (KeyboardInterrupt, SystemExit):  # stopped where no stop is checked for: not a failure either
            self.keep_newest_checkpoint(picked, candidate)
            discard(candidate)
            self.store.finish_run(run_id, RunStatus.INTERRUPTED, decision=RunStatus.INTERRUPTED.value,
                                  reason="interrupted; the next run resumes from its last checkpoint, if it had one")
            raise
        except Exception as exc:
            discard(candidate)
            reason = f"{type(exc).__name__}: {exc}".strip()[:2000]
            # a model that cannot be loaded, a full disk, too little memory: the next run waits longer, but
            # these runs never count towards setting the traces aside, which are not at fault
            decision = NOT_THE_TRACES if isinstance(exc, ENVIRONMENT_ERRORS) else RunStatus.FAILED.value
            self.store.finish_run(run_id, RunStatus.FAILED, decision=decision, reason=reason)
            traceback.print_exc()
            set_aside = set_aside_if_stuck(self.store, self.domain, self.config)
            return CycleResult(run_id, self.domain, RunStatus.FAILED, f"{reason}; {set_aside}" if set_aside
                               else reason)

    def select(self) -> Selection:
        """New train traces since the last run, a replay sample of older ones, the held-out set."""
        try:
            current_version(self.home, self.domain)
        except ManifestError as exc:  # not the traces' fault: no run, nothing consumed
            raise _Skip(f"{exc}; repair it with `conch kd rollback --domain {self.domain} --to vNNNN`") from None
        mark = self.store.trained_upto(self.domain)
        state = self._resume_state()
        if state and state["upto_rowid"] <= mark:  # a checkpoint of traces already consumed or set aside
            _drop_resume(self.folder)
            state = None
        upto = state["upto_rowid"] if state else self.store.max_rowid(self.domain)
        cap = self.config.max_traces_per_run
        new = self.store.traces_of(self.domain, "train", since_rowid=mark, upto_rowid=upto, limit=cap)
        if len(new) == cap:  # a backlog: this run takes the oldest `cap`, the next check the rest
            upto = new[-1]["rowid"]
        replay = (self.store.traces_of(self.domain, "train", upto_rowid=mark, sample=self.config.replay_count)
                  if mark else [])
        # at most max_heldout_per_run, drawn at random as the replay is (all of them, when there are fewer)
        held = sorted(self.store.traces_of(self.domain, "heldout", upto_rowid=upto,
                                           sample=self.config.max_heldout_per_run), key=lambda t: t["rowid"])
        if not new and not self.force:
            raise _Skip("no new train traces since the last run")
        if not new + replay:
            raise _Skip("no train traces at all")
        resume = None
        if state and state.get("iters") == self.kd.num_iters:
            resume = (self.folder / RESUME_DIR, state["iteration"])
        return Selection(mark, upto, new, replay, held, resume)

    def train(self, picked: Selection, candidate: Path) -> DistillResult:
        """Distil a candidate from the current version, measured on the held-out traces."""
        distiller = TrueKnowledgeDistiller(self.config.teacher, self.config.student, self.kd,
                                           output_dir=self.home, cache_dir=self.home / TEACHER_CACHE_DIR,
                                           callbacks=self.callbacks)
        established = picked.established
        groups = {"established": established} if established and len(established) < len(picked.held) else None
        options = DistillOptions(warm_start=current_adapter_path(self.home, self.domain), adapter_dir=candidate,
                                 resume=picked.resume, heldout_groups=groups,
                                 measure_on_policy=self.config.measure_on_policy)
        _tell_followers(self.plan(picked, groups))
        try:
            return distiller.distill_domain(self.domain, picked.new + picked.replay, picked.held or None, options)
        finally:
            TeacherCache(self.home / TEACHER_CACHE_DIR).evict(int(self.config.teacher_cache_max_mb * 2**20))

    def plan(self, picked: Selection, groups: dict | None) -> dict:
        """What the other ranks of a data-parallel run train on, and how (conch_dna.lifecycle.plan sends it)."""
        return {"teacher": self.config.teacher, "student": self.config.student, "kd": asdict(self.kd),
                "train": picked.new + picked.replay, "held": picked.held, "groups": groups,
                "resume": picked.resume, "measure_on_policy": self.config.measure_on_policy,
                "timeout_s": self.config.distributed.timeout_s}

    def gate(self, picked: Selection, result: DistillResult) -> tuple[bool, str]:
        established = (result.heldout_groups or {}).get("established")
        return decide(result.heldout_before, result.heldout_after, len(picked.held), self.config, self.domain,
                      self.force, established)

    def publish(self, candidate: Path, measured_against: str | None, reason: str) -> tuple[str | None, str]:
        """(the new version, reason), or (None, why not) when the current version changed while
        this run measured the candidate against it."""
        for checkpoint in candidate.glob("checkpoint_*"):  # a version is an adapter, not a training run
            discard(checkpoint)
        try:
            version = promote(self.home, self.domain, candidate, reason, expected_current=measured_against)
        except StaleCandidate as exc:
            return None, str(exc)
        prune_versions(self.home, self.domain, self.config.keep_versions)
        return version, reason

    def record(self, run_id: int, picked: Selection, result: DistillResult, version: str | None,
               reason: str) -> CycleResult:
        status = RunStatus.PROMOTED if version else RunStatus.REJECTED
        self.store.mark_trained(self.domain, picked.upto)
        _drop_resume(self.folder)
        established = (result.heldout_groups or {}).get("established")
        current = _with_established(result.heldout_before, established, "before")
        candidate = _with_established(result.heldout_after, established, "after")
        self.store.finish_run(run_id, status, decision=status.value, reason=reason,
                              version=version or current_version(self.home, self.domain),
                              current_metrics=current, candidate_metrics=candidate, history=result.history,
                              samples_generated=result.samples_generated, phase_seconds=result.phase_seconds,
                              kd_settings=changed_settings(self.kd))
        return CycleResult(run_id, self.domain, status, reason, version, result.heldout_before,
                           result.heldout_after)

    def interrupted(self, run_id: int, picked: Selection, candidate: Path, stop: TrainingInterrupted) -> CycleResult:
        """Keep the checkpoint for the next run of the domain, which resumes it on the same traces."""
        if stop.checkpoint:
            resume_dir = self.folder / RESUME_DIR
            discard(resume_dir)
            os.rename(stop.checkpoint, resume_dir)
            atomic_write_json(self.folder / RESUME_FILE, {"iteration": stop.iteration, "upto_rowid": picked.upto,
                                                          "iters": self.kd.num_iters})
        discard(candidate)
        reason = (f"interrupted at step {stop.iteration}; the next run resumes from its checkpoint"
                  if stop.checkpoint else "interrupted before training started")
        self.store.finish_run(run_id, RunStatus.INTERRUPTED, decision=RunStatus.INTERRUPTED.value, reason=reason)
        return CycleResult(run_id, self.domain, RunStatus.INTERRUPTED, reason)

    def keep_newest_checkpoint(self, picked: Selection, candidate: Path) -> int | None:
        """The candidate's newest checkpoint as the domain's resume point (for the same traces); its step."""
        steps = sorted((int(p.name.rpartition("_")[2]), p) for p in candidate.glob("checkpoint_*")
                       if p.name.rpartition("_")[2].isdigit())
        if not steps:
            return None
        step, checkpoint = steps[-1]
        discard(self.folder / RESUME_DIR)
        os.rename(checkpoint, self.folder / RESUME_DIR)
        atomic_write_json(self.folder / RESUME_FILE, {"iteration": step, "upto_rowid": picked.upto,
                                                      "iters": self.kd.num_iters})
        return step

    def rank_failed(self, run_id: int, picked: Selection, candidate: Path, reason: str) -> CycleResult:
        """A rank died or hung: the run failed, with why; its newest checkpoint is kept, so the next run
        of the domain resumes from it on the same traces (no version was written)."""
        kept = ""
        if (step := self.keep_newest_checkpoint(picked, candidate)) is not None:
            kept = f"; the next run resumes from its checkpoint at step {step}"
        elif (state := self._resume_state()) is not None:  # it failed before a checkpoint of its own
            kept = f"; the next run resumes from the checkpoint at step {state['iteration']} again"
        discard(candidate)
        reason = f"{reason}{kept}"
        self.store.finish_run(run_id, RunStatus.FAILED, decision=NOT_THE_TRACES, reason=reason)
        return CycleResult(run_id, self.domain, RunStatus.FAILED, reason)

    def _resume_state(self) -> dict | None:
        try:
            state = json.loads((self.folder / RESUME_FILE).read_text())
            return state if isinstance(state.get("upto_rowid"), int) and isinstance(state.get("iteration"), int) \
                else None
        except (OSError, ValueError, AttributeError):
            return None


def _drop_resume(folder: Path) -> None:
    (folder / RESUME_FILE).unlink(missing_ok=True)
    discard(folder / RESUME_DIR)

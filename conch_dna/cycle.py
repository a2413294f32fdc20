"""One retrain cycle of one domain: select traces, distil, validate against the current adapter,
promote or reject, and record the run. The daemon and `conch kd retrain` both call retrain_domain."""

from __future__ import annotations

import json
import math
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

from conch_dna.config import Config, load_config
from conch_dna.domains import check_domain
from conch_dna.fsutil import atomic_write_json
from conch_dna.store import TraceStore
from conch_dna.versions import (
    DomainBusy,
    StaleCandidate,
    current_adapter_path,
    current_version,
    discard,
    domain_dir,
    domain_lock,
    promote,
)

RESUME_FILE = ".resume.json"
RESUME_DIR = ".resume"


@dataclass
class CycleResult:
    run_id: int | None
    domain: str
    status: str  # promoted / rejected / skipped / interrupted / failed
    reason: str
    version: str | None = None
    current_metrics: dict | None = None
    candidate_metrics: dict | None = None


def open_store(home: str | Path, config: Config) -> TraceStore:
    return TraceStore(Path(home) / "conch.db", config.domains, config.heldout_fraction)


def _with_established(metrics: dict | None, established: dict | None, side: str) -> dict | None:
    """A run's metrics, plus those on the held-out traces the current version was validated on."""
    if metrics is None or not established:
        return metrics
    return {**metrics, "established": established[side]}


def agreement_tolerance(current: dict, max_drop: float) -> float:
    """How far top-1 agreement may fall: `max_drop`, or the measurement's own noise if larger.

    On a few hundred held-out tokens top-1 moves by points from chance alone (two binomial standard
    errors at p = 0.8 and 300 tokens is 4.6 points), and a fixed 1% would reject candidates whose
    KL clearly fell; with thousands of tokens the noise shrinks and `max_drop` rules again.
    """
    p, tokens = current["agreement"], current.get("tokens") or 0
    noise = 2.0 * math.sqrt(p * (1.0 - p) / tokens) if tokens else 0.0
    return max(max_drop, noise)


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(metrics[k]) for k in ("kl", "agreement"))


def _metric_words(metrics: dict) -> str:
    return f"KL {metrics['kl']:.4f}, top-1 {metrics['agreement']:.1%}"


def decide(current: dict | None, candidate: dict | None, n_heldout: int, config: Config, domain: str,
           force: bool, established: dict | None = None) -> tuple[bool, str]:
    """The promotion gate: (promote?, the reason in words).

    `established` = {"before", "after"} metrics on the held-out traces the current version was
    validated on: a candidate may not get worse there by more than the margin, so a bad batch
    whose own held-out share the candidate has learned cannot vote itself in.
    """
    minimum = config.heldout_minimum(domain)
    if n_heldout < minimum:
        if force:
            return True, f"forced: only {n_heldout} held-out traces (gate needs {minimum})"
        return False, f"only {n_heldout} held-out traces, the gate needs {minimum} (--force to promote anyway)"
    if not current or not candidate:
        return force, "forced without held-out metrics" if force else "no held-out metrics"
    if not _finite(candidate):
        return False, f"the candidate's held-out metrics are not finite ({_metric_words(candidate)})"
    if not _finite(current):  # the current version cannot be measured: a finite candidate replaces it
        return True, (f"the current version's held-out metrics are not finite ({_metric_words(current)}); "
                      f"the candidate's are ({_metric_words(candidate)})")
    gain = 1.0 - candidate["kl"] / current["kl"] if current["kl"] > 0 else 0.0
    words = (f"held-out KL {current['kl']:.4f} -> {candidate['kl']:.4f} ({-gain:+.1%}), "
             f"top-1 {current['agreement']:.1%} -> {candidate['agreement']:.1%}")
    if gain < config.promote_margin:
        return False, f"{words}: KL must fall by at least {config.promote_margin:.0%}"
    allowed = agreement_tolerance(current, config.max_agreement_drop)
    if candidate["agreement"] < current["agreement"] - allowed:
        return False, f"{words}: top-1 agreement fell by more than {allowed:.1%}"
    if established:
        old, new = established["before"]["kl"], established["after"]["kl"]
        if not math.isfinite(new) or new > old * (1.0 + config.promote_margin):
            return False, (f"{words}; but on the {established['before']['tokens']} held-out tokens the current "
                           f"version was validated on, KL rose {old:.4f} -> {new:.4f}")
    return True, words


def pending(store: TraceStore, domain: str) -> int:
    """New train traces of a domain since its last completed run."""
    return store.counts(domain).new_train


def _resume_state(home: Path, domain: str) -> dict | None:
    try:
        return json.loads((domain_dir(home, domain) / RESUME_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _keep_for_resume(home: Path, domain: str, checkpoint: Path, iteration: int, upto: int, iters: int) -> None:
    """Move an interrupted run's checkpoint aside so the next run of the domain continues it."""
    resume_dir = domain_dir(home, domain) / RESUME_DIR
    discard(resume_dir)
    os.rename(checkpoint, resume_dir)
    atomic_write_json(domain_dir(home, domain) / RESUME_FILE,
                      {"iteration": iteration, "upto_rowid": upto, "iters": iters})


def _drop_resume(home: Path, domain: str) -> None:
    (domain_dir(home, domain) / RESUME_FILE).unlink(missing_ok=True)
    discard(domain_dir(home, domain) / RESUME_DIR)


def retrain_domain(home: str | Path, domain: str, config: Config | None = None, iters: int | None = None,
                   force: bool = False, on_report=None, console=None, should_stop=None) -> CycleResult:
    """One cycle; should_stop() turning true interrupts it (a SIGTERM): the checkpoint is kept and
    the next cycle of the domain resumes from it with the same traces. One cycle of a domain at a
    time: while another holds the domain's lock this one is skipped."""
    home = Path(home)
    config = config or load_config(home)
    check_domain(domain, config.domains)
    try:
        with domain_lock(home, domain):
            return _retrain_locked(home, domain, config, iters, force, on_report, console, should_stop)
    except DomainBusy as exc:
        return CycleResult(None, domain, "skipped", str(exc))


def _retrain_locked(home: Path, domain: str, config: Config, iters, force, on_report, console,
                    should_stop) -> CycleResult:
    store = open_store(home, config)
    mark = store.db.conn.execute("SELECT last_rowid FROM training_marks WHERE domain = ?", (domain,)).fetchone()
    mark = mark[0] if mark else 0
    resume_state = _resume_state(home, domain)
    upto = resume_state["upto_rowid"] if resume_state else store.max_rowid(domain)
    new = store.traces_of(domain, "train", since_rowid=mark, upto_rowid=upto)
    replay = store.traces_of(domain, "train", upto_rowid=mark, sample=config.replay_count) if mark else []
    held = store.traces_of(domain, "heldout", upto_rowid=upto)
    if not new and not force:
        return CycleResult(None, domain, "skipped", "no new train traces since the last run")
    if not new + replay:
        return CycleResult(None, domain, "skipped", "no train traces at all")

    kd = config.kd.kd_config(num_iters=iters or config.iters(domain))
    resume = None
    if resume_state and resume_state["iters"] == kd.num_iters:
        resume = (domain_dir(home, domain) / RESUME_DIR, resume_state["iteration"])
    from conch_dna.training.true_kd import TrainingInterrupted

    run_id = store.start_run(domain, upto_rowid=upto, new_traces=len(new), replay_traces=len(replay),
                             heldout_traces=len(held), iters=kd.num_iters)
    candidate_dir = domain_dir(home, domain) / f".candidate-{run_id}"
    try:
        from conch_dna.training.true_kd import TrueKnowledgeDistiller

        distiller = TrueKnowledgeDistiller(config.teacher, config.student, kd, output_dir=home,
                                           cache_dir=home / "teacher_cache", console=console)
        measured_against = current_version(home, domain)  # what the gate compares the candidate with
        established = [t for t in held if t["rowid"] <= mark]
        groups = {"established": established} if established and len(established) < len(held) else None
        try:
            result = distiller.distill_domain(domain, new + replay, held or None,
                                              warm_start=current_adapter_path(home, domain),
                                              on_report=on_report, adapter_dir=candidate_dir,
                                              should_stop=should_stop, resume=resume, heldout_groups=groups)
        except TrainingInterrupted as stop:
            if stop.checkpoint:
                _keep_for_resume(home, domain, stop.checkpoint, stop.iteration, upto, kd.num_iters)
            discard(candidate_dir)
            reason = (f"interrupted at step {stop.iteration}; the next run resumes from its checkpoint"
                      if stop.checkpoint else "interrupted before training started")
            store.finish_run(run_id, "interrupted", decision="interrupted", reason=reason)
            return CycleResult(run_id, domain, "interrupted", reason)
        established = (result.heldout_groups or {}).get("established")
        ok, reason = decide(result.heldout_before, result.heldout_after, len(held), config, domain, force,
                            established)
        version = None
        if ok:  # a version is an adapter, not a training run: its checkpoints (and Adam state) stay out
            for checkpoint in candidate_dir.glob("checkpoint_*"):
                discard(checkpoint)
            try:
                version = promote(home, domain, candidate_dir, reason, expected_current=measured_against)
            except StaleCandidate as exc:
                ok, reason = False, str(exc)
        if not ok:
            discard(candidate_dir)
        status = "promoted" if ok else "rejected"
        store.mark_trained(domain, upto)
        _drop_resume(home, domain)
        store.finish_run(run_id, status, decision=status, reason=reason,
                         version=version or current_version(home, domain),
                         current_metrics=_with_established(result.heldout_before, established, "before"),
                         candidate_metrics=_with_established(result.heldout_after, established, "after"),
                         history=result.history)
        return CycleResult(run_id, domain, status, reason, version, result.heldout_before, result.heldout_after)
    except BaseException as exc:
        discard(candidate_dir)
        reason = f"{type(exc).__name__}: {exc}".strip()
        store.finish_run(run_id, "failed", decision="failed", reason=reason[:2000])
        if isinstance(exc, Exception):
            traceback.print_exc()
            return CycleResult(run_id, domain, "failed", reason)
        raise

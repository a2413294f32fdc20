"""Student first, the EGO when needed: whether a version's own answer is served, by the acceptance rule fitted at
its gate (lifecycle.acceptance), and, in Python, `neurons.get(d).generate(..., defer="auto")`, which asks the
home's EGO when the rule refuses the answer and records the EGO's answer as a trace. `conch serve`'s
`auto/<domain>` (server/cascade.py) judges with the same Deferral.

Every answer says who wrote it (Answer.answered_by: `domain@vNNNN` or `ego`, Answer.deferred, Answer.signal:
the student's mean token log-probability); the calls are counted per domain and version in the store."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from conch_dna.lifecycle.acceptance import accepts, read_acceptance
from conch_dna.models.chat import to_chat
from conch_dna.models.loading import ModelLoadError
from conch_dna.models.tools import Answer, same_calls
from conch_dna.models.versions import domain_dir
from conch_dna.training.evaluation import answer_checks

from neurons.batching import Call, Finish

log = logging.getLogger("conch.neurons")
RULES_KEPT = 64  # versions whose rules are kept read


class TeacherUnavailable(RuntimeError):
    """A deferred call whose teacher could not answer, with auto_unverified = "refuse"."""


def same_answer(text: str, calls: list[dict], their_text: str | None, their_calls: list[dict] | None) -> bool:
    """Whether two answers are the same: the same calls (names and arguments), or the same text up to whitespace."""
    if their_calls or calls:
        return bool(their_calls) and all(same_calls(calls, their_calls))
    return " ".join(text.split()) == " ".join((their_text or "").split())


class Deferral:
    """A home's acceptance rules, read once per version, and the counts of what auto/ served."""

    def __init__(self, home: Path, config, tokenizer):
        self.home, self.config, self.tokenizer = Path(home), config, tokenizer
        self._rules: dict[tuple[str, str], dict | None] = {}
        self._lock = threading.Lock()
        self._store = self._ego = None

    def rule(self, domain: str, version: str) -> dict | None:
        """The version's acceptance rule (a version's folder never changes); None: defer every call."""
        if version == "base":
            return None
        with self._lock:
            if (domain, version) in self._rules:
                return self._rules[(domain, version)]
        rule = read_acceptance(domain_dir(self.home, domain) / version)
        with self._lock:
            if len(self._rules) >= RULES_KEPT:
                self._rules.pop(next(iter(self._rules)))
            self._rules[(domain, version)] = rule
        return rule

    def score(self, call: Call) -> dict:
        """What the rule reads of an answer (a call made with logprobs): its mean token log-probability, whether
        it ended, how it repeats."""
        tokens = [t.token for t in call.token_logprobs]
        confidence = (sum(t.logprob for t in call.token_logprobs) / len(tokens)) if tokens else float("-inf")
        repeats = answer_checks(self.tokenizer, [tokens])["repeated_4grams"]
        return {"confidence": confidence, "ended": call.finish_reason is Finish.STOP, "repeated_4grams": repeats}

    def judge(self, domain: str, call: Call) -> tuple[bool, dict]:
        """(whether the call's version accepts its answer, the answer's score)."""
        score = self.score(call)
        return accepts(self.rule(domain, call.version), score), score

    @property
    def store(self):
        from conch_dna.traces.store import TraceStore

        with self._lock:
            if self._store is None:
                self._store = TraceStore.for_home(self.home, self.config)
            return self._store

    def count(self, domain: str, version: str, outcome: str, teacher_seconds: float = 0.0,
              agreed: bool | None = None) -> None:
        self.store.count_auto_answer(domain, version, outcome, round(teacher_seconds, 3), agreed)

    def ego(self):
        """The home's EGO (the config's teacher, in this process), loaded on the first deferral."""
        from conch_dna.traces.ego import Ego

        store = self.store  # one store for the counts and the EGO's traces
        with self._lock:
            if self._ego is None:
                self._ego = Ego(home=self.home, store=store)
            return self._ego

    def answer(self, call: Call, domain: str, prompt, max_tokens: int, tools, tool_choice,
               response_format) -> Answer:
        """The answer of a finished call of `domain` made with logprobs: its own where its version's rule takes
        it, else the EGO's (recorded as a trace of `domain`)."""
        parsed = call.parsed()
        own = provenance(Answer.read(call.text, parsed), f"{domain}@{call.version}", False)
        accepted, score = self.judge(domain, call)
        own.signal = score["confidence"]
        if accepted:
            self.count(domain, call.version, "served")
            return own
        chat = to_chat(domain, prompt)
        tic = time.perf_counter()
        try:
            theirs = self.ego().generate(domain, chat.messages, max_tokens, tools if tools is not None else chat.tools,
                                         tool_choice, response_format)
        except (ModelLoadError, OSError, MemoryError) as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("%s: the teacher could not answer a deferred call (%s)", domain, reason)
            if self.config.auto_unverified == "refuse":
                raise TeacherUnavailable(f"the student's answer was not accepted and the teacher could not answer: "
                                         f"{reason}") from exc
            self.count(domain, call.version, "unverified")  # time lost to a failure, not a teacher's answer
            own.unverified = reason
            return own
        self.count(domain, call.version, "deferred", time.perf_counter() - tic,
                   same_answer(call.text, parsed.tool_calls, theirs.content, theirs.tool_calls))
        deferred = provenance(theirs, "ego", True)
        deferred.signal = own.signal
        return deferred

    def close(self) -> None:
        with self._lock:
            ego, store, self._ego, self._store = self._ego, self._store, None, None
        if ego is not None:
            ego.close()
        if store is not None:
            store.close()


def provenance(answer: Answer, answered_by: str, deferred: bool) -> Answer:
    answer.answered_by, answer.deferred = answered_by, deferred
    return answer

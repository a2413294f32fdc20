"""When a version's own answer may be served without the teacher: a threshold on the version's confidence in its
answer (the mean log-probability of its tokens), fitted at the gate on its greedy held-out answers so that the
answers it accepts meet a quality bound against the teacher, and read by `auto/<domain>` when it serves.

The teacher's score alone would accept a loop (a teacher predicts a loop once it reads one), so an answer that
repeats itself is never accepted, whatever its confidence or KL, nor one that did not end where the teacher's
answers end. A version whose answers meet the bound at no threshold defers everything: a correct outcome, not
an error.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from conch_dna.settings.config import Config
from conch_dna.system.fsutil import atomic_write_json

log = logging.getLogger("conch.acceptance")
ACCEPTANCE_FILE = "acceptance.json"  # in a version's folder, beside its adapter
NEVER = math.inf  # the threshold of a version that defers everything
CURVE_POINTS = 64  # of the share-served curve kept with a rule: [threshold, share served, their mean KL]


def acceptable(score: dict, max_repeat: float, require_end: bool = True) -> bool:
    """An answer that may be accepted at all: it does not loop, and it ended (where the rule requires it)."""
    return (bool(score["ended"]) or not require_end) and score["repeated_4grams"] <= max_repeat


def accepts(rule: dict | None, score: dict) -> bool:
    """Whether a version's rule (None: it has none) accepts an answer it wrote now."""
    return (rule is not None and acceptable(score, rule["max_repeat"], rule.get("require_end", True))
            and score["confidence"] >= rule["threshold"])


def fit_acceptance(scores: list[dict], config: Config, teacher_ended: float | None = None) -> dict:
    """The lowest confidence threshold at which the accepted answers' mean teacher-scored KL per token stays
    within config.auto_max_kl (the most answers served at the bound), with what it is expected to serve.

    `scores`: one per held-out answer, {"confidence", "kl", "repeated_4grams", "ended"}. An answer at the
    threshold is accepted, so answers of equal confidence are taken or left together. "curve": at each
    threshold (at most CURVE_POINTS of them, the lowest always kept), the share served and their mean KL.

    `teacher_ended`: the share of the teacher's held-out answers that end within the budget the version
    answered in. An answer cut by its budget is refused only where the teacher's mostly end (then a student
    that runs on is rambling); where the teacher's are cut too, ending is not asked, the loop check stays."""
    require_end = teacher_ended is None or teacher_ended >= 0.5
    takeable = sorted((s for s in scores if acceptable(s, config.auto_max_repeat, require_end)),
                      key=lambda s: -s["confidence"])
    threshold, served, kl_sum, i, curve = NEVER, [], 0.0, 0, []
    while i < len(takeable):
        level, j = takeable[i]["confidence"], i
        while j < len(takeable) and takeable[j]["confidence"] == level:
            kl_sum, j = kl_sum + takeable[j]["kl"], j + 1
        if kl_sum / j <= config.auto_max_kl:
            threshold, served = level, takeable[:j]
        curve.append([round(level, 4), round(j / len(scores), 4), round(kl_sum / j, 4)])
        i = j
    step = max(1, -(-len(curve) // CURVE_POINTS))
    return {"threshold": threshold, "bound_kl": config.auto_max_kl, "max_repeat": config.auto_max_repeat,
            "require_end": require_end, "teacher_ended": teacher_ended,
            "answers": len(scores), "expected_share": len(served) / len(scores) if scores else 0.0,
            "accepted_kl": sum(s["kl"] for s in served) / len(served) if served else None,
            "curve": curve[::-step][::-1] if curve else []}


def write_acceptance(folder: Path, rule: dict) -> None:
    atomic_write_json(folder / ACCEPTANCE_FILE, {**rule, "threshold": _json_number(rule["threshold"])})


def read_acceptance(folder: Path) -> dict | None:
    """A version's rule, or None (with the reason logged) when it has none or it cannot be read: then every
    call defers."""
    path = Path(folder) / ACCEPTANCE_FILE
    try:
        rule = json.loads(path.read_text())
        threshold = rule["threshold"]
        rule["threshold"] = NEVER if threshold is None else float(threshold)
        if math.isnan(rule["threshold"]) or not isinstance(rule.get("max_repeat"), (int, float)):
            raise ValueError("its threshold or max_repeat is not a number")
        return rule
    except FileNotFoundError:
        log.info("%s has no acceptance rule: auto/ defers every call to the teacher", Path(folder).name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("the acceptance rule %s cannot be read (%s): auto/ defers every call to the teacher", path, exc)
    return None


def _json_number(value: float) -> float | None:
    return None if math.isinf(value) else value  # JSON has no infinity: null is "never"

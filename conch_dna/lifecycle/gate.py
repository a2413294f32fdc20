"""The promotion gate: whether a candidate adapter replaces the current one, and why, in words."""

from __future__ import annotations

import math

from conch_dna.settings.config import Config, GateMetric


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


def _on_policy(metrics: dict | None) -> dict | None:
    return metrics.get("on_policy") if metrics else None


def _tool_words(metrics: dict) -> str:
    return f"{metrics['arguments']:.0%} of {metrics['traces']} held-out tool calls right, {metrics['parsed']:.0%} parse"


def decide(current: dict | None, candidate: dict | None, n_heldout: int, config: Config, domain: str,
           force: bool, established: dict | None = None) -> tuple[bool, str]:
    """The promotion gate: (promote?, the reason in words).

    Metrics are held-out metrics as distill_domain measures them; config.gate_metric picks the
    teacher-forced ones, those under "on_policy" (each version's own answers), "both" (the teacher-forced KL
    must fall by the margin and the on-policy KL may not rise by more than it), or "tool_calls":
    the share of held-out tool calls the version answers with the teacher's call, the
    teacher-forced KL deciding a tie. Whatever the metric, a candidate whose tool calls parse less
    often than the current version's (by more than max_tool_parse_drop) is not promoted.
    `established` = {"before", "after"} metrics on the held-out traces the current version was
    validated on: a candidate may not get worse there by more than the margin, so a bad batch
    whose own held-out share the candidate has learned cannot vote itself in.
    """
    minimum = config.heldout_minimum(domain)
    if n_heldout < minimum:
        if force:
            return True, f"forced: only {n_heldout} held-out traces (gate needs {minimum})"
        return False, f"only {n_heldout} held-out traces, the gate needs {minimum} (--force to promote anyway)"
    promoted, words = _decide_kl(current, candidate, config, force, established)
    if promoted and (why := degeneration((current or {}).get("answers"), (candidate or {}).get("answers"), config)):
        return False, f"{words}; but its answers degenerate against the current version's: {why}"
    forms = [(m or {}).get("formats") for m in (current, candidate)]
    if promoted and all(forms) and forms[1]["valid"] < forms[0]["valid"] - config.max_format_drop:
        return False, (f"{words}; but the share of held-out answers that validate against their response_format "
                       f"fell {forms[0]['valid']:.0%} -> {forms[1]['valid']:.0%} (answered free)")
    tools = [(m or {}).get("tool_calls") for m in (current, candidate)]
    if not all(tools):
        return promoted, words
    old, new = tools
    if config.gate_metric is GateMetric.TOOL_CALLS and new["arguments"] != old["arguments"] and _finite(candidate):
        better = new["arguments"] > old["arguments"]
        promoted, words = better, (f"tool calls: {_tool_words(old)} -> {_tool_words(new)}"
                                   + ("" if better else ": fewer are right"))
    if promoted and new["parsed"] < old["parsed"] - config.max_tool_parse_drop:
        return False, (f"{words}; but the share of held-out tool calls that parse fell "
                       f"{old['parsed']:.0%} -> {new['parsed']:.0%}")
    return promoted, words


def degeneration(current: dict | None, candidate: dict | None, config: Config) -> str | None:
    """Why the candidate's greedy held-out answers are worse in kind than the current version's (a loop,
    fewer distinct bigrams, answers that no longer end), or None. The teacher scores a loop well once it
    reads one, so no KL can see this; the answers themselves can."""
    if not current or not candidate or not current.get("answers") or not candidate.get("answers"):
        return None
    found = []
    if candidate["repeated_4grams"] > current["repeated_4grams"] + config.max_repeat_rise:
        found.append(f"repeated token 4-grams {current['repeated_4grams']:.2f} -> {candidate['repeated_4grams']:.2f}")
    if candidate["distinct_2"] < config.min_distinct_ratio * current["distinct_2"]:
        found.append(f"distinct token bigrams {current['distinct_2']:.2f} -> {candidate['distinct_2']:.2f}")
    if (1.0 - candidate["ended"]) > (1.0 - current["ended"]) + config.max_unended_rise:
        found.append(f"answers that end {current['ended']:.0%} -> {candidate['ended']:.0%}")
    old, new = (_against_teacher(m, "entropy", "teacher_entropy") for m in (current, candidate))
    if new is not None and new < config.min_entropy_ratio and (old is None or new < old):
        found.append(f"token entropy against the teacher's {_ratio(old)} -> {new:.2f} "
                     f"(under {config.min_entropy_ratio:g})")
    old, new = (_against_teacher(m, "tokens", "teacher_tokens") for m in (current, candidate))
    bound = config.max_length_ratio
    if new is not None and not 1 / bound <= new <= bound and (old is None or abs(math.log(new)) > abs(math.log(old))):
        found.append(f"answer length against the teacher's {_ratio(old)} -> {new:.2f} "
                     f"(outside 1/{bound:g} to {bound:g})")
    return ", ".join(found) or None


def _against_teacher(answers: dict, key: str, teacher_key: str) -> float | None:
    """answers[key] / answers[teacher_key], where both were measured (older runs have neither) and positive."""
    mine, theirs = answers.get(key), answers.get(teacher_key)
    ok = all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in (mine, theirs))
    return mine / theirs if ok else None


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _decide_kl(current: dict | None, candidate: dict | None, config: Config, force: bool,
               established: dict | None) -> tuple[bool, str]:
    if config.gate_metric is not GateMetric.BOTH:
        return _decide_one(current, candidate, config, force, established, config.gate_metric is GateMetric.ON_POLICY)
    promoted, words = _decide_one(current, candidate, config, force, established, False)
    old, new = _on_policy(current), _on_policy(candidate)
    if not promoted or not old or not new or not _finite(old):  # measured without the teacher: the first alone
        return promoted, words
    rose = not _finite(new) or new["kl"] > old["kl"] * (1.0 + config.promote_margin)
    words = f"{words}; on-policy KL {old['kl']:.4f} -> {new['kl']:.4f}"
    if rose:
        return False, f"{words}: it may not rise by more than {config.promote_margin:.0%}"
    return True, words


def _decide_one(current: dict | None, candidate: dict | None, config: Config, force: bool,
                established: dict | None, on_policy: bool) -> tuple[bool, str]:
    held = "held-out"
    if on_policy:
        held = "on-policy held-out"
        current, candidate = _on_policy(current), _on_policy(candidate)
        if established:
            established = {side: _on_policy(established[side]) for side in ("before", "after")}
            established = established if all(established.values()) else None
    if not current or not candidate:
        return force, f"forced without {held} metrics" if force else f"no {held} metrics"
    if not _finite(candidate):
        return False, f"the candidate's {held} metrics are not finite ({_metric_words(candidate)})"
    if not _finite(current):  # the current version cannot be measured: a finite candidate replaces it
        return True, (f"the current version's {held} metrics are not finite ({_metric_words(current)}); "
                      f"the candidate's are ({_metric_words(candidate)})")
    gain = 1.0 - candidate["kl"] / current["kl"] if current["kl"] > 0 else 0.0
    words = (f"{held} KL {current['kl']:.4f} -> {candidate['kl']:.4f} ({-gain:+.1%}), "
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

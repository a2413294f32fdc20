"""Held-out metrics of a student: against the teacher's cached targets, and, on traces whose answer
is a tool call, its own greedy calls against the teacher's."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from conch_dna.models.tools import parse_answer, same_calls, tool_call_format
from conch_dna.system import distributed
from conch_dna.training.data import KDExample, collate
from conch_dna.training.losses import answer_token_losses

import mlx.core as mx


@dataclass
class HeldoutMetrics:
    kl: float  # mean per-token KL(teacher ‖ student) at T = 1, over the teacher's top-k + tail
    ce: float  # mean cross-entropy of the teacher's answer tokens under the student
    agreement: float  # share of answer tokens where the student's argmax is the teacher's top-1
    tokens: int
    # mean token entropy in nats over the top-k + the rest as one bucket (k: the teacher's top-k width), so
    # the two read alike: the student's at the answer positions, and the teacher's there from its targets
    entropy: float = float("nan")
    teacher_entropy: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


def heldout_metrics(model, examples: list[KDExample], batch_size: int = 8,
                    max_seq_length: int = 2048) -> HeldoutMetrics:
    """KL to the teacher, CE on teacher tokens and top-1 agreement, over every answer token.

    The same per-token terms as training (answer_token_losses at T = 1, forward KL), in the same
    window, so padded top-k entries and cut prompts count here exactly as they do there.
    Raises ValueError when there is nothing to evaluate.
    """
    if not examples:
        raise ValueError("no held-out examples to evaluate on")
    sums_total = [0.0] * 6  # kl, ce, top-1 agreement, the student's entropy, the teacher's, answer tokens
    examples = distributed.shard(examples)  # data-parallel: each rank its share, the sums added up below
    for i in range(0, len(examples), batch_size):
        inputs, targets, mask, ids, logprobs, *_ = collate(examples[i : i + batch_size], max_seq_length)
        logits = model(inputs)
        # the held-out metric is KL(teacher ‖ student) at T = 1, whatever divergence training used
        kl, ce = answer_token_losses(logits, ids, logprobs, targets, 1.0, "forward_kl", 0.5)
        agree = (mx.argmax(logits, axis=-1) == ids[..., 0]).astype(mx.float32)
        logp = logits.astype(mx.float32)
        own = topk_entropy(mx.topk(logp - mx.logsumexp(logp, axis=-1, keepdims=True), logprobs.shape[-1], axis=-1))
        sums = [(x * mask).sum() for x in (kl, ce, agree, own, topk_entropy(logprobs))] + [mask.sum()]
        mx.eval(sums)
        sums_total = [a + b.item() for a, b in zip(sums_total, sums)]
    kl_sum, ce_sum, agree_sum, own_sum, teacher_sum, count = distributed.all_sum(sums_total, "held-out metrics")
    if count == 0:
        raise ValueError("the held-out examples hold no answer token inside the window")
    return HeldoutMetrics(kl_sum / count, ce_sum / count, agree_sum / count, int(count), own_sum / count,
                          teacher_sum / count)


def answer_scores(model, examples: list[KDExample], batch_size: int = 8, max_seq_length: int = 2048) -> list[dict]:
    """Per example (a version's own answer, scored by the teacher): the version's confidence in its answer
    (the mean log-probability of the answer's tokens under itself, what serving reads off a call's token
    log-probs), the teacher-scored KL per token and the share of its tokens that are the teacher's top-1. What
    an acceptance rule is fitted on."""
    out = []
    for i in range(0, len(examples), batch_size):
        batch = [replace(e, on_policy=False) for e in examples[i : i + batch_size]]  # targets: its own tokens
        inputs, targets, mask, ids, logprobs, *_ = collate(batch, max_seq_length)
        kl, ce = answer_token_losses(model(inputs), ids, logprobs, targets, 1.0, "forward_kl", 0.5)
        count = mx.maximum(mask.sum(axis=-1), 1.0)
        confidence, per_kl = -(ce * mask).sum(axis=-1) / count, (kl * mask).sum(axis=-1) / count
        top1 = ((ids[..., 0] == targets) * mask).sum(axis=-1) / count  # the teacher's first choice, written
        mx.eval(confidence, per_kl, top1)
        out += [{"confidence": c, "kl": k, "agreement": a}
                for c, k, a in zip(confidence.tolist(), per_kl.tolist(), top1.tolist())]
    return out


def topk_entropy(logprobs: mx.array) -> mx.array:
    """Entropy in nats of distributions given by their top-k log-probs [..., k], the mass outside the top-k
    counted as one more outcome: the same measure for a student's full distribution cut to k and for the
    teacher's cached top-k. A padded entry (PAD_LOGPROB) weighs nothing."""
    p = mx.exp(logprobs.astype(mx.float32))
    tail = mx.maximum(1.0 - p.sum(axis=-1), 0.0)
    return -(p * logprobs).sum(axis=-1) - tail * mx.log(mx.maximum(tail, 1e-12))


def answers_tool_call(trace) -> bool:
    """Whether a held-out trace's teacher answer is a tool call."""
    return isinstance(trace, dict) and bool(trace["messages"][-1].get("tool_calls"))


def tool_call_metrics(tokenizer, traces: list[dict], answers: list[list[int]]) -> dict:
    """How a version's greedy answers to held-out traces whose teacher answer is a tool call compare
    with the teacher's calls: the share that parse (every call readable, at least one), that call the
    teacher's functions (in order), and that give them the teacher's arguments too (as JSON)."""
    fmt = tool_call_format(tokenizer)
    eos = set(tokenizer.eos_token_ids)
    parsed = names = arguments = 0
    for trace, answer in zip(traces, answers, strict=True):
        got = parse_answer(tokenizer.decode([t for t in answer if t not in eos]), fmt, trace.get("tools"))
        same_name, same_arguments = same_calls(got.tool_calls, trace["messages"][-1]["tool_calls"])
        parsed, names, arguments = parsed + got.parsed, names + same_name, arguments + same_arguments
    n = len(traces)
    return {"traces": n, "parsed": parsed / n, "name": names / n, "arguments": arguments / n}


def _repeated_share(ids: list[int], n: int) -> float:
    """The share of an answer's n-grams that repeat an n-gram earlier in the same answer."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def _distinct_share(ids: list[int], n: int) -> float:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def answers_format(trace) -> bool:
    """Whether a held-out trace's answer was asked in a response_format (json_object or json_schema)."""
    return isinstance(trace, dict) and bool(trace.get("response_format"))


def format_metrics(tokenizer, traces: list[dict], free: list[list[int]], held: list[list[int]]) -> dict:
    """How a version's greedy answers to held-out traces asked in a response_format hold to it: the share
    that validate against their schema (jsonschema, independent of the grammar engine), answered free and
    answered held to the form. An answer that never ended (ran to its token budget) is not valid."""
    import jsonschema

    eos = set(tokenizer.eos_token_ids)

    def valid(trace: dict, answer: list[int]) -> bool:
        if not answer or answer[-1] not in eos:
            return False
        form = trace["response_format"]
        schema = form["json_schema"]["schema"] if form["type"] == "json_schema" else {"type": "object"}
        try:
            jsonschema.validate(json.loads(tokenizer.decode([t for t in answer if t not in eos])), schema)
        except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
            return False
        return True

    n = len(traces)
    return {"traces": n, "valid": sum(map(valid, traces, free)) / n, "valid_held": sum(map(valid, traces, held)) / n}


def answer_checks(tokenizer, answers: list[list[int]]) -> dict:
    """What a version's greedy answers to the held-out prompts look like, whatever their KL: the share of token
    4-grams that repeat one earlier in the same answer, the share of distinct token bigrams, the share of
    answers that ended (an end-of-turn token) rather than running to their token budget, and their mean
    length in tokens; each averaged over the answers. A student that has found text the teacher finds easy to
    predict (a loop) scores well on the on-policy KL and badly here. Tokens, not words: a cut student's
    sub-word loop ("ortunateortunate...") is one long word, and some languages write no spaces."""
    eos = set(tokenizer.eos_token_ids)
    repeated, distinct, ended, tokens = [], [], [], []
    for answer in answers:
        ids = [t for t in answer if t not in eos]
        repeated.append(_repeated_share(ids, 4))
        distinct.append(_distinct_share(ids, 2))
        ended.append(bool(answer) and answer[-1] in eos)
        tokens.append(len(answer))
    n = max(len(answers), 1)
    return {"answers": len(answers), "repeated_4grams": sum(repeated) / n, "distinct_2": sum(distinct) / n,
            "ended": sum(ended) / n, "tokens": sum(tokens) / n}

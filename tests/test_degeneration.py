"""The gate reads the answers too: a candidate whose greedy held-out answers loop, lose their variety or stop
ending is not promoted, whatever its KL (the teacher scores a loop well once it reads one)."""

import json
import shutil
from pathlib import Path

from conch_dna.cli.main import app
from conch_dna.kit import TEACHER_PATH, corpus
from conch_dna.lifecycle.gate import decide
from conch_dna.lifecycle.report import build_report
from conch_dna.settings.config import Config, GateMetric, load_config
from conch_dna.traces.ingest import ingest_file
from conch_dna.traces.runs import RunStatus
from conch_dna.traces.store import TraceStore
from conch_dna.training.evaluation import answer_checks

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import retrain
from tests.test_daemon import drop, teacher_traces, write_config

runner = CliRunner()


def test_answer_checks_count_repeats_variety_and_endings(student):
    _, tokenizer = student
    eos = next(iter(tokenizer.eos_token_ids))
    word = [i for i in range(5, 40) if i not in tokenizer.eos_token_ids]
    loop = word[:4] * 3 + [eos]  # a sub-word loop and a phrase loop look the same in tokens
    plain = word[4:7]  # ran to its budget: no end
    checks = answer_checks(tokenizer, [loop, plain])
    # by hand: 12 tokens, 9 4-grams of which 4 distinct (5 repeat); 11 bigrams, 4 distinct; 3 tokens: no
    # 4-gram, 2 bigrams both distinct
    assert checks["answers"] == 2 and checks["ended"] == 0.5
    assert checks["repeated_4grams"] == pytest.approx((5 / 9 + 0.0) / 2)
    assert checks["distinct_2"] == pytest.approx((4 / 11 + 1.0) / 2)
    assert checks["tokens"] == (len(loop) + len(plain)) / 2
    no_spaces = tokenizer.encode("ortunate" * 12, add_special_tokens=False)  # one long "word": still a loop
    assert answer_checks(tokenizer, [no_spaces])["repeated_4grams"] > 0.5


def versions(cur_answers: dict, cand_answers: dict) -> tuple[dict, dict]:
    """A current version and a candidate whose KLs, teacher-forced and on-policy, say promote."""
    current = {"kl": 1.0, "agreement": 0.8, "on_policy": {"kl": 1.0, "agreement": 0.7}, "answers": cur_answers}
    candidate = {"kl": 0.7, "agreement": 0.82, "on_policy": {"kl": 0.5, "agreement": 0.9}, "answers": cand_answers}
    return current, candidate


TEACHER_LIKE = {"answers": 10, "repeated_4grams": 0.02, "distinct_2": 0.88, "ended": 0.9, "tokens": 40.0}


@pytest.mark.parametrize("metric", [GateMetric.TEACHER_FORCED, GateMetric.ON_POLICY])
def test_a_candidate_that_loops_is_refused_with_the_degeneration_named_whatever_its_kl(metric):
    config = Config(min_heldout=4, gate_metric=metric)
    looping = {"answers": 10, "repeated_4grams": 0.9, "distinct_2": 0.08, "ended": 0.1, "tokens": 48.0}
    ok, why = decide(*versions(TEACHER_LIKE, looping), 10, config, "task", False)
    assert not ok and "its answers degenerate against the current version's" in why
    assert "repeated token 4-grams 0.02 -> 0.90" in why and "distinct token bigrams 0.88 -> 0.08" in why
    assert "answers that end 90% -> 10%" in why
    assert decide(*versions(TEACHER_LIKE, TEACHER_LIKE), 10, config, "task", False)[0] is True


def test_each_check_at_its_bound_and_off():
    config = Config(min_heldout=4)
    edge = {**TEACHER_LIKE, "repeated_4grams": 0.02 + 0.2, "distinct_2": 0.7 * 0.88, "ended": 0.9 - 0.25}
    assert decide(*versions(TEACHER_LIKE, edge), 10, config, "task", False)[0] is True  # at the bound: allowed
    for key, value, words in (("repeated_4grams", 0.23, "repeated token 4-grams"),
                              ("distinct_2", 0.61, "distinct token bigrams"), ("ended", 0.64, "answers that end")):
        ok, why = decide(*versions(TEACHER_LIKE, {**TEACHER_LIKE, key: value}), 10, config, "task", False)
        assert not ok and words in why, key
    off = Config(min_heldout=4, max_repeat_rise=1.0, min_distinct_ratio=0.0, max_unended_rise=1.0)
    worst = {"answers": 10, "repeated_4grams": 1.0, "distinct_2": 0.0, "ended": 0.0, "tokens": 48.0}
    assert decide(*versions(TEACHER_LIKE, worst), 10, off, "task", False)[0] is True
    # versions measured without their answers (measure_on_policy = false): the KL rules alone
    current, candidate = versions(TEACHER_LIKE, worst)
    del current["answers"]
    assert decide(current, candidate, 10, config, "task", False)[0] is True


def test_every_run_records_both_versions_answers(tmp_path):
    home = tmp_path / "home"
    write_config(home, domains=["debug"], min_heldout=2)
    drop(home, "d.jsonl", teacher_traces("debug", 32, seed=7))
    store = TraceStore.for_home(home, load_config(home))
    ingest_file(store, home / "inbox" / "d.jsonl")
    result = retrain(home, "debug", iters=4, force=True)
    for side in (result.current_metrics, result.candidate_metrics):
        answers = side["answers"]  # one greedy answer per held-out trace, of each version
        assert answers["answers"] == store.counts("debug").heldout > 0
        assert 0.0 <= answers["repeated_4grams"] <= 1.0 and 0.0 <= answers["distinct_2"] <= 1.0
        assert 0.0 <= answers["ended"] <= 1.0 and answers["tokens"] > 0


LOOP = " ".join(["check the log and restart it"] * 8)


def looping_dialogues(n: int, seed: int) -> list[list[dict]]:
    dialogues = corpus.dialogues(n, seed=seed, domains=["debug"])
    for d in dialogues:
        d[2]["content"] = LOOP
    return dialogues


@pytest.fixture(scope="module")
def looping_teacher(tmp_path_factory):
    """A teacher that predicts a loop once it reads one, as the real one does (the issue's measurement): the kit
    teacher trained further on debug dialogues whose answers loop. The kit teacher itself does not copy."""
    from conch_dna.kit.build import encode_dialogues, train_lm

    from mlx.utils import tree_flatten
    from mlx_lm import load

    out = tmp_path_factory.mktemp("looping-teacher")
    model, tokenizer = load(TEACHER_PATH)
    train_lm(model, encode_dialogues(tokenizer, looping_dialogues(400, seed=11)), steps=15, lr=3e-3, batch_size=8)
    for f in Path(TEACHER_PATH).iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    return out


def test_a_student_trained_to_loop_is_refused_though_its_on_policy_kl_is_lower(tmp_path, conch_home,
                                                                              looping_teacher):
    home = conch_home  # the CLI's home too
    write_config(home, domains=["debug"], min_heldout=2, teacher=str(looping_teacher), gate_metric="on_policy")
    drop(home, "loop.jsonl", [json.dumps({"domain": "debug", "teacher": str(looping_teacher), "messages": d})
                              for d in looping_dialogues(48, seed=3)])
    store = TraceStore.for_home(home, load_config(home))
    ingest_file(store, home / "inbox" / "loop.jsonl")

    result = retrain(home, "debug")
    current, candidate = result.current_metrics, result.candidate_metrics
    # every KL says promote: the candidate matches the teacher on its own answers far better than the bare student
    assert candidate["on_policy"]["kl"] < 0.5 * current["on_policy"]["kl"]
    assert candidate["kl"] < 0.5 * current["kl"]
    assert result.status is RunStatus.REJECTED and result.version is None
    assert "its answers degenerate against the current version's" in result.reason
    assert "repeated token 4-grams" in result.reason and "distinct token bigrams" in result.reason
    assert candidate["answers"]["repeated_4grams"] > 0.5 > current["answers"]["repeated_4grams"]
    # and a person reads why: in the history, the status and the report
    history = json.loads(runner.invoke(app, ["kd", "history", "--domain", "debug", "--json"]).output)
    assert "repeated token 4-grams" in history[0]["reason"]
    status = json.loads(runner.invoke(app, ["kd", "status", "--json"]).output)
    assert "repeated token 4-grams" in json.dumps(status)
    report = build_report(home, load_config(home), tmp_path / "report")
    assert "repeated token 4-grams" in report.read_text()


def test_topk_entropy_is_the_entropy_with_the_rest_as_one_outcome():
    from conch_dna.training.evaluation import topk_entropy

    p = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    whole = float(topk_entropy(mx.array(np.log(p))[None]).item())
    assert whole == pytest.approx(-(p * np.log(p)).sum(), abs=1e-5)
    top2 = float(topk_entropy(mx.array(np.log(p[:2]))[None]).item())  # the rest, 0.25, as one outcome
    assert top2 == pytest.approx(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)), abs=1e-5)
    padded = np.log(np.array([0.5, 0.5, 1e-30]))  # a padded entry (PAD_LOGPROB-like) weighs nothing
    assert float(topk_entropy(mx.array(padded)[None]).item()) == pytest.approx(np.log(2), abs=1e-5)


def with_teacher(answers: dict, entropy: float, tokens: float) -> dict:
    return {**answers, "entropy": entropy, "teacher_entropy": 1.0, "tokens": tokens, "teacher_tokens": 40.0}


@pytest.mark.parametrize("cur, cand, refused", [
    ((0.9, 40.0), (0.5, 40.0), "token entropy against the teacher's 0.90 -> 0.50"),  # overconfident
    ((0.4, 40.0), (0.5, 40.0), None),  # under the bound, but no worse than the current version
    ((0.9, 40.0), (0.9, 8.0), "answer length against the teacher's 1.00 -> 0.20"),  # stops short
    ((0.9, 40.0), (0.9, 130.0), "answer length against the teacher's 1.00 -> 3.25"),  # runs on
    ((0.9, 8.0), (0.9, 10.0), None),  # short, but less short than the current version
])
def test_entropy_and_length_are_read_against_the_teachers(cur, cand, refused):
    ok, why = decide(*versions(with_teacher(TEACHER_LIKE, *cur), with_teacher(TEACHER_LIKE, *cand)), 10,
                     Config(min_heldout=4), "task", False)
    assert (ok, refused is None or refused in why) == (refused is None, True), why
    off = Config(min_heldout=4, min_entropy_ratio=0.0, max_length_ratio=float("inf"))
    assert decide(*versions(with_teacher(TEACHER_LIKE, *cur), with_teacher(TEACHER_LIKE, *cand)), 10, off,
                  "task", False)[0] is True


def test_both_kls_must_agree_under_the_both_metric():
    config = Config(min_heldout=4, gate_metric=GateMetric.BOTH)
    current, candidate = versions(TEACHER_LIKE, TEACHER_LIKE)
    assert decide(current, candidate, 10, config, "task", False)[0] is True
    candidate["on_policy"]["kl"] = 1.0 * (1 + config.promote_margin) + 0.01  # teacher-forced fell, its own rose
    ok, why = decide(current, candidate, 10, config, "task", False)
    assert not ok and "on-policy KL 1.0000 -> 1.0300: it may not rise by more than 2%" in why
    assert decide(current, candidate, 10, Config(min_heldout=4, gate_metric=GateMetric.TEACHER_FORCED), "task",
                  False)[0] is True  # teacher-forced alone
    candidate["on_policy"]["kl"], candidate["kl"] = 0.5, 0.99  # its own fell, teacher-forced barely moved
    ok, why = decide(current, candidate, 10, config, "task", False)
    assert not ok and "KL must fall by at least 2%" in why
    del current["on_policy"], candidate["on_policy"]  # measured without the teacher: teacher-forced decides
    candidate["kl"] = 0.7
    assert decide(current, candidate, 10, config, "task", False)[0] is True

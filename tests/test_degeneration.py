"""The gate reads the answers too: a candidate whose greedy held-out answers loop, lose their variety or stop
ending is not promoted, whatever its KL (the teacher scores a loop well once it reads one)."""

from conch_dna.lifecycle.gate import decide
from conch_dna.settings.config import Config, GateMetric
from conch_dna.training.evaluation import answer_checks

import pytest

from tests.conftest import retrain
from tests.test_daemon import drop, teacher_traces, write_config


def test_answer_checks_count_repeats_variety_and_endings(student):
    _, tokenizer = student
    eos = next(iter(tokenizer.eos_token_ids))
    loop = tokenizer.encode("check the log and " * 3, add_special_tokens=False) + [eos]
    plain = tokenizer.encode("restart the build", add_special_tokens=False)  # ran to its budget: no end
    checks = answer_checks(tokenizer, [loop, plain])
    # by hand: 12 words, 9 word 4-grams of which 4 distinct (5 repeat); 11 bigrams, 4 distinct; 3 words: no
    # 4-gram, 2 bigrams both distinct
    assert checks["answers"] == 2 and checks["ended"] == 0.5
    assert checks["repeated_4grams"] == pytest.approx((5 / 9 + 0.0) / 2)
    assert checks["distinct_2"] == pytest.approx((4 / 11 + 1.0) / 2)
    assert checks["tokens"] == (len(loop) + len(plain)) / 2


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
    assert "repeated word 4-grams 0.02 -> 0.90" in why and "distinct word bigrams 0.88 -> 0.08" in why
    assert "answers that end 90% -> 10%" in why
    assert decide(*versions(TEACHER_LIKE, TEACHER_LIKE), 10, config, "task", False)[0] is True


def test_each_check_at_its_bound_and_off():
    config = Config(min_heldout=4)
    edge = {**TEACHER_LIKE, "repeated_4grams": 0.02 + 0.2, "distinct_2": 0.7 * 0.88, "ended": 0.9 - 0.25}
    assert decide(*versions(TEACHER_LIKE, edge), 10, config, "task", False)[0] is True  # at the bound: allowed
    for key, value, words in (("repeated_4grams", 0.23, "repeated word 4-grams"),
                              ("distinct_2", 0.61, "distinct word bigrams"), ("ended", 0.64, "answers that end")):
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
    from conch_dna.settings.config import load_config
    from conch_dna.traces.ingest import ingest_file
    from conch_dna.traces.store import TraceStore

    store = TraceStore.for_home(home, load_config(home))
    ingest_file(store, home / "inbox" / "d.jsonl")
    result = retrain(home, "debug", iters=4, force=True)
    for side in (result.current_metrics, result.candidate_metrics):
        answers = side["answers"]  # one greedy answer per held-out trace, of each version
        assert answers["answers"] == store.counts("debug").heldout > 0
        assert 0.0 <= answers["repeated_4grams"] <= 1.0 and 0.0 <= answers["distinct_2"] <= 1.0
        assert 0.0 <= answers["ended"] <= 1.0 and answers["tokens"] > 0

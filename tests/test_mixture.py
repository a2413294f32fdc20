"""Several teachers for one student: the mixture of their top-k, against a NumPy reference and in a run."""

import json

from conch_dna.training import true_kd
from conch_dna.training.kd_config import KDConfig
from conch_dna.training.losses import PAD_LOGPROB
from conch_dna.training.targets.mixture import mix_topk
from conch_dna.training.targets.teacher import TeacherCache, TeacherScorer

import numpy as np
import pytest


def topk_of(p: np.ndarray, k: int):
    ids = np.argsort(-p, axis=1)[:, :k]
    return ids.astype(np.int32), np.log(np.take_along_axis(p, ids, 1)).astype(np.float32)


def test_the_mixture_is_the_weighted_sum_of_each_teachers_top_k_and_keeps_their_tails():
    rng = np.random.default_rng(0)
    vocab, k = 40, 6
    dense = [rng.dirichlet(np.full(vocab, 0.3), size=5) for _ in range(3)]
    weights = [2.0, 1.0, 1.0]
    targets = [topk_of(p, k) for p in dense]
    ids, logprobs = mix_topk(targets, weights, k)

    # reference: the dense mixture, each teacher counting only the ids of its own top-k
    w = np.array(weights) / sum(weights)
    known = np.zeros((5, vocab))
    for wt, (t_ids, t_lps) in zip(w, targets):
        np.put_along_axis(known, t_ids, np.take_along_axis(known, t_ids, 1) + wt * np.exp(t_lps), 1)
    best = np.argsort(-known, axis=1, kind="stable")[:, :k]
    assert (np.sort(ids, 1) == np.sort(best, 1)).all()
    assert np.allclose(np.exp(logprobs), np.take_along_axis(known, ids, 1), rtol=1e-5)
    assert (np.diff(logprobs, axis=1) <= 0).all()
    # the tail: every teacher's tail, weighted, plus what the cut to k dropped
    tails = sum(wt * (1 - np.exp(t_lps).sum(1)) for wt, (_, t_lps) in zip(w, targets))
    dropped = known.sum(1) - np.take_along_axis(known, best, 1).sum(1)
    assert np.allclose(1 - np.exp(logprobs).sum(1), tails + dropped, atol=1e-6)


def test_one_teacher_mixes_to_itself_and_padding_holds_no_mass():
    ids = np.array([[4, 2, 0]], np.int32)
    lps = np.array([[np.log(0.5), np.log(0.25), PAD_LOGPROB]], np.float32)
    got_ids, got_lps = mix_topk([(ids, lps)], [3.0], 3)
    assert got_ids[0, :2].tolist() == [4, 2] and np.allclose(got_lps[0, :2], lps[0, :2])
    assert got_lps[0, 2] == PAD_LOGPROB


def test_a_run_with_two_teachers_trains_on_their_mixture_one_model_at_a_time(kit, tmp_path, monkeypatch):
    from tests.test_on_policy import ResidentModels

    # the kit's student base stands in for a second teacher: it shares the teacher's vocabulary
    teachers = [{"model": kit["teacher"], "weight": 3.0}, {"model": kit["student"], "weight": 1.0}]
    config = KDConfig(num_iters=2, lora_rank=8, top_k=16, max_answer_tokens=24, teachers=teachers, on_policy=0.0)
    # every load asserts the model of the other path is gone: teacher 1 is released before teacher 2
    # (the student's path) loads, and both before the student trains
    models = ResidentModels(kit["teacher"], monkeypatch)
    distiller = true_kd.TrueKnowledgeDistiller("not-used", kit["student"], config, output_dir=tmp_path)
    prompts = [f"Why did the build fail on step {i}?" for i in range(3)]
    result = distiller.distill_domain("thinking", prompts, ["Why is the queue slow?"])
    assert result.teacher_forward_passes == 2 * 4  # both teachers, the 3 train and 1 held-out prompts
    assert models.loads[:3] == ["student", "teacher", "student"]  # the student answers, then each teacher
    saved = json.loads((tmp_path / "adapters_kd" / "thinking" / "adapter_config.json").read_text())
    assert saved["kd"]["teachers"] == teachers and saved["kd"]["teacher"] == kit["teacher"]

    # the targets a run trains on are the mixture of what each teacher cached for the same tokens
    model, tokenizer, _ = distiller.load_student()
    del model
    example = distiller.teacher_examples("thinking", prompts[:1], tokenizer)[0]
    cache = TeacherCache(tmp_path / "teacher_cache")
    each = [TeacherScorer(t["model"], cache, 16).targets(example.tokens.tolist(), example.offset) for t in teachers]
    ids, logprobs = mix_topk(each, [3.0, 1.0], 16)
    assert (example.topk_ids == ids).all() and np.allclose(example.topk_logprobs, logprobs)
    assert not (ids == each[0][0]).all()  # the second teacher moved something


@pytest.mark.parametrize("teachers,message", [
    ([{"model": "a"}], r"teachers\[0\] must be"),
    ([{"model": "a", "weight": 0}], r"teachers\[0\].weight must be a number > 0"),
    ([{"model": "a", "weight": 1}, {"model": "a", "weight": 2}], "names a model twice"),
])
def test_teachers_are_checked(teachers, message):
    with pytest.raises(ValueError, match=message):
        KDConfig(teachers=teachers)

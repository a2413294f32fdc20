"""The packed teacher targets: what a loss reads survives packing, in 150 bytes a token or less."""

from conch_dna.training.losses import PAD_LOGPROB
from conch_dna.training.targets.teacher import TeacherCache
from conch_dna.training.targets.topk_codec import decode_topk, encode_topk

import numpy as np
import pytest
from safetensors.numpy import save_file


def teacher_like_topk(rows: int, k: int = 64, vocab: int = 49152, seed: int = 0):
    """Top-k of softmaxes over a Zipf-shaped vocabulary, as a teacher's answer rows look: a few
    likely tokens, frequent (low) ids likelier, a long tail outside the top k."""
    rng = np.random.default_rng(seed)
    logits = rng.gumbel(size=(rows, vocab)) * 1.5 - 1.2 * np.log1p(np.arange(vocab))
    logits[np.arange(rows), rng.integers(0, vocab, rows)] += rng.uniform(4, 14, rows)  # the answer token
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-logp, axis=1)[:, :k]
    return ids.astype(np.int32), np.take_along_axis(logp, ids, 1)


def kl_with_tail(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL over the k + 1 buckets a sparse KD loss sees (top-k and the tail), per row."""
    tail_p = np.clip(1 - np.exp(p).sum(1), 1e-9, None)
    tail_q = np.clip(1 - np.exp(q).sum(1), 1e-9, None)
    return (np.exp(p) * (p - q)).sum(1) + tail_p * np.log(tail_p / tail_q)


def aligned(ids, logprobs, by_ids):
    """logprobs reordered to the slots of by_ids (each row holds the same ids)."""
    out = np.empty(by_ids.shape)
    for r in range(len(by_ids)):
        where = {t: i for i, t in enumerate(ids[r].tolist())}
        out[r] = logprobs[r][[where[t] for t in by_ids[r].tolist()]]
    return out


def test_packing_keeps_every_id_the_top1_and_the_tail_in_150_bytes_a_token():
    ids, logp = teacher_like_topk(200)
    packed = encode_topk(ids, logp)
    got_ids, got_lp = decode_topk(packed)
    assert got_ids.dtype == np.int32 and got_lp.dtype == np.float32 and got_ids.shape == ids.shape
    assert (np.sort(got_ids, 1) == np.sort(ids, 1)).all()
    assert (got_ids[:, 0] == ids[:, 0]).all()
    back = aligned(got_ids, got_lp.astype(np.float64), ids)
    raw_tail = 1 - np.exp(logp).sum(1)
    assert np.allclose(1 - np.exp(back).sum(1), raw_tail, atol=2e-3)  # the tail bucket stays put
    assert kl_with_tail(logp, back).mean() < 5e-4
    assert np.abs(back[:, 0] - logp[:, 0]).max() < 0.03  # finest where the mass is
    assert (np.diff(got_lp[:, 1:].astype(np.float32), axis=1) <= 0).all()  # best first
    assert len(packed) / len(ids) <= 150


def test_a_peaked_rows_tail_survives_packing():
    # p(top-1) = 0.9999: rounding its log-prob alone would move the tail bucket by more than its size,
    # and at T = 2 that bucket weighs as much as the runner-up
    logp = np.log(np.array([[0.9999, 4e-5, 2e-5, 1e-5]]))
    tail = 1 - np.exp(logp).sum()
    _, got = decode_topk(encode_topk(np.array([[5, 9, 2, 40]], np.int32), logp))
    assert abs((1 - np.exp(got.astype(np.float64)).sum()) / tail - 1) < 0.01


def test_edge_rows_pack_too():
    for ids, logp in [
        (np.zeros((0, 64), np.int32), np.zeros((0, 64))),
        (np.array([[7]], np.int32), np.array([[-0.2]])),
        (np.array([[0, 0, 5]], np.int32), np.array([[0.0, -np.inf, -1e4]])),  # a padded capture
        (np.array([[(1 << 24) - 1, 151935, 3]], np.int32), np.array([[-0.1, -2.5, -40.0]])),
    ]:
        got_ids, got_lp = decode_topk(encode_topk(ids, logp))
        assert got_ids.shape == ids.shape and (np.sort(got_ids, 1) == np.sort(ids, 1)).all()
        if len(ids):
            assert got_ids[0, 0] == ids[0, 0] and abs(float(got_lp[0, 0]) - max(logp[0, 0], -30)) < 0.05
            # padding (and what lies below it) stays padding: exactly PAD_LOGPROB, as many as there were
            assert (got_lp == PAD_LOGPROB).sum() == (logp <= PAD_LOGPROB).sum() and got_lp.min() >= PAD_LOGPROB
    with pytest.raises(ValueError, match="ids must be in"):
        encode_topk(np.array([[1 << 24]]), np.array([[-1.0]]))
    with pytest.raises(ValueError, match="width must be 1..65535, got 0"):
        encode_topk(np.zeros((3, 0), np.int32), np.zeros((3, 0)))


def test_bytes_that_are_not_a_packed_target_are_refused_by_name():
    packed = encode_topk(*teacher_like_topk(4))
    for broken, reason in [(b"PK\x03\x04" + packed[4:], "no CONCHTK1 header"), (packed[:-9], "does not unpack"),
                           (packed[:12], "no CONCHTK1 header")]:
        with pytest.raises(ValueError, match=reason):
            decode_topk(broken)


def test_the_cache_reads_targets_written_before_packing_and_drops_torn_ones(tmp_path):
    cache = TeacherCache(tmp_path)
    ids, logp = teacher_like_topk(6, seed=1)
    legacy = cache.path("ab" * 32).with_suffix(".safetensors")
    legacy.parent.mkdir(mode=0o700)
    save_file({"ids": ids, "logprobs": logp.astype(np.float16)}, str(legacy))
    got_ids, got_lp = cache.get("ab" * 32)
    assert (got_ids == ids).all() and (got_lp == logp.astype(np.float16)).all()

    stored = cache.put("cd" * 32, ids, logp)
    assert cache.path("cd" * 32).suffix == ".topk"
    assert all((a == b).all() for a, b in zip(cache.get("cd" * 32), stored))
    cache.path("cd" * 32).write_bytes(cache.path("cd" * 32).read_bytes()[:-5])
    assert cache.get("cd" * 32) is None and not cache.path("cd" * 32).exists()
    assert {p.suffix for _, _, p in cache.entries()} == {".safetensors"}

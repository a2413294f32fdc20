"""Each loss against an independent numpy reference written from its textbook definition."""

from conch_dna.models.loading import VocabMismatchError, check_shared_vocab
from conch_dna.training.losses import (
    PAD_LOGPROB,
    align_vocab_sizes,
    compute_ce_loss,
    compute_kd_loss,
    divergence,
    generalized_jsd,
    sparse_kd_loss,
    token_string_map,
)

import mlx.core as mx
import numpy as np
import pytest

rng = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test draws the same numbers whatever ran before it (pytest-randomly shuffles)."""
    global rng
    rng = np.random.default_rng(0)


def np_softmax(x, t=1.0):
    z = x / t - (x / t).max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def logits(*shape, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0])
def test_kd_loss_is_tempered_kl_times_t_squared(temperature):
    t, s = logits(2, 5, 17), logits(2, 5, 17)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], np.float32)
    kl = np_kl(np_softmax(t, temperature), np_softmax(s, temperature))
    expected = (kl * mask).sum() / mask.sum() * temperature**2
    got = compute_kd_loss(mx.array(t), mx.array(s), temperature, mx.array(mask)).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_kd_loss_is_zero_for_identical_and_positive_otherwise():
    t = logits(3, 11)
    assert compute_kd_loss(mx.array(t), mx.array(t), 2.0).item() == pytest.approx(0, abs=1e-5)
    assert compute_kd_loss(mx.array(t), mx.array(logits(3, 11)), 2.0).item() > 0.01


def test_kd_loss_truncates_padded_teacher_vocab():
    t, s = logits(4, 20), logits(4, 16)
    expected = np_kl(np_softmax(t[:, :16], 2.0), np_softmax(s, 2.0)).mean() * 4
    assert compute_kd_loss(mx.array(t), mx.array(s), 2.0).item() == pytest.approx(expected, rel=1e-4)
    assert compute_kd_loss(mx.array(t), mx.array(s)).item() == pytest.approx(expected, rel=1e-4)  # T = 2 by default


def test_ce_loss_ignores_ignore_index():
    x = logits(2, 4, 9)
    y = np.array([[1, 2, -100, 3], [-100, -100, 8, 0]])
    p = np_softmax(x)
    keep = y != -100
    expected = -np.log(p[keep, y[keep]]).mean()
    got = compute_ce_loss(mx.array(x), mx.array(y)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def np_sparse_reference(teacher_logits, student_logits, k, temperature):
    """Build the k+1-bucket distributions by hand: top-k of the teacher, then 'the rest'."""
    pt, ps = np_softmax(teacher_logits.astype(np.float64)), np_softmax(student_logits.astype(np.float64))
    ids = np.argsort(-pt, axis=-1)[..., :k]
    t_top = np.take_along_axis(pt, ids, -1)
    s_top = np.take_along_axis(ps, ids, -1)
    t_b = np.concatenate([t_top, 1 - t_top.sum(-1, keepdims=True)], -1)
    s_b = np.concatenate([s_top, 1 - s_top.sum(-1, keepdims=True)], -1)
    kl = np_kl(np_softmax(np.log(t_b), temperature), np_softmax(np.log(s_b), temperature))
    return ids, np.log(t_top), kl.mean() * temperature**2


@pytest.mark.parametrize("k,temperature", [(1, 1.0), (4, 1.0), (8, 2.0), (15, 3.0)])
def test_sparse_kd_keeps_tail_bucket(k, temperature):
    t, s = logits(3, 6, 16), logits(3, 6, 16)
    ids, lp, expected = np_sparse_reference(t, s, k, temperature)
    got = sparse_kd_loss(mx.array(s), mx.array(ids), mx.array(lp), temperature).item()
    # float32 against a float64 reference: with 15 of 16 ids the tail is 1 minus nearly 1
    assert got == pytest.approx(expected, rel=3e-3)


def test_sparse_kd_with_a_mask_averages_the_unmasked_tokens_only():
    t, s = logits(2, 5, 16), logits(2, 5, 16)
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], np.float32)
    ids, lp, _ = np_sparse_reference(t, s, 4, 2.0)
    per_token = [np_sparse_reference(t[b, i][None], s[b, i][None], 4, 2.0)[2] for b, i in zip(*np.nonzero(mask))]
    got = sparse_kd_loss(mx.array(s), mx.array(ids), mx.array(lp), 2.0, mx.array(mask)).item()
    assert got == pytest.approx(np.mean(per_token), rel=1e-3)
    unmasked = sparse_kd_loss(mx.array(s), mx.array(ids), mx.array(lp), 2.0).item()
    assert abs(unmasked - got) > 1e-3  # the masked tokens would change it
    one = np.zeros_like(mask)
    one[1, 2] = 1  # a single answer token: its own loss
    alone = sparse_kd_loss(mx.array(s), mx.array(ids), mx.array(lp), 2.0, mx.array(one)).item()
    assert alone == pytest.approx(np_sparse_reference(t[1, 2][None], s[1, 2][None], 4, 2.0)[2], rel=1e-3)
    assert sparse_kd_loss(mx.array(s), mx.array(ids), mx.array(lp), 2.0, mx.zeros((2, 5))).item() == 0.0


def test_sparse_kd_differs_from_renormalised_top_k():
    # A flat teacher: its top-4 hold little mass. Renormalising would pretend they hold it all.
    t, s = logits(2, 32, scale=0.1), logits(2, 32)
    ids, lp, expected = np_sparse_reference(t, s, 4, 1.0)
    pt = np.exp(lp) / np.exp(lp).sum(-1, keepdims=True)
    ps = np.take_along_axis(np_softmax(s), ids, -1)
    renormalised = np_kl(pt, ps / ps.sum(-1, keepdims=True)).mean()
    got = sparse_kd_loss(mx.array(s), mx.array(ids), mx.array(lp), 1.0).item()
    assert got == pytest.approx(expected, rel=1e-3)
    assert abs(got - renormalised) > 0.05


def test_padded_top_k_entries_change_nothing():
    # A capture of width 4 padded to 8 with (id 0, PAD_LOGPROB), as a narrow capture or a masked
    # out-of-vocabulary id is: the student's mass on id 0 must not be counted four more times.
    t, s = logits(2, 5, 16), logits(2, 5, 16)
    s[..., 0] += 3.0  # the student likes id 0, so counting it would show
    ids, lp, expected = np_sparse_reference(t, s, 4, 2.0)
    ids, lp = ids[..., ::-1].copy(), lp[..., ::-1].copy()  # id 0 may be among the real four as well
    padded_ids = np.concatenate([ids, np.zeros_like(ids)], -1)
    padded_lp = np.concatenate([lp, np.full_like(lp, PAD_LOGPROB)], -1)
    got = sparse_kd_loss(mx.array(s), mx.array(padded_ids), mx.array(padded_lp), 2.0).item()
    assert got == pytest.approx(expected, rel=1e-3)


def test_sparse_kd_with_full_k_equals_dense():
    t, s = logits(2, 3, 12), logits(2, 3, 12)
    lp = np.log(np_softmax(t))
    ids = np.argsort(-lp, -1)
    lp_sorted = np.take_along_axis(lp, ids, -1)
    dense = compute_kd_loss(mx.array(t), mx.array(s), 2.0).item()
    sparse = sparse_kd_loss(mx.array(s), mx.array(ids), mx.array(lp_sorted), 2.0).item()
    assert sparse == pytest.approx(dense, rel=2e-3)


def test_reverse_kl_and_jsd_match_definitions():
    p, q = np_softmax(logits(3, 5, 7)), np_softmax(logits(3, 5, 7))  # [batch, tokens, vocab]
    lp, lq = mx.array(np.log(p)), mx.array(np.log(q))
    reverse = divergence(lp, lq, "reverse_kl")
    assert reverse.shape == (3, 5) and np.allclose(reverse, np_kl(q, p), rtol=1e-4)
    for beta in (0.1, 0.5, 0.9):
        m = beta * p + (1 - beta) * q
        expected = beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
        assert np.allclose(divergence(lp, lq, "jsd", beta), expected, rtol=1e-4, atol=1e-6)
    m = (p + q) / 2  # the default β is the symmetric JSD
    assert np.allclose(generalized_jsd(lp, lq), (np_kl(p, m) + np_kl(q, m)) / 2, rtol=1e-4, atol=1e-6)
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"jsd beta must be in \(0, 1\), got {beta}"):
            generalized_jsd(lp, lq, beta)
    with pytest.raises(ValueError, match="unknown divergence 'bogus'"):
        divergence(lp, lq, "bogus")


def test_jsd_is_bounded_by_log_two():
    p = np.full((1, 4), 1e-9)
    p[0, 0] = 1
    q = np.full((1, 4), 1e-9)
    q[0, 3] = 1
    got = divergence(mx.array(np.log(p)), mx.array(np.log(q)), "jsd", 0.5).item()
    assert got == pytest.approx(np.log(2), rel=1e-3)


class Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_check_shared_vocab_accepts_padded_family_and_rejects_permuted_ids():
    base = {f"t{i}": i for i in range(100)}
    check_shared_vocab(Tok({**base, "<extra>": 100}), Tok(base))
    shuffled = {f"t{i}": (i * 7) % 100 for i in range(100)}
    with pytest.raises(VocabMismatchError, match="do not share token ids"):
        check_shared_vocab(Tok(base), Tok(shuffled))


def test_check_shared_vocab_tolerates_up_to_one_percent_of_unknown_student_tokens():
    student = {f"t{i}": i for i in range(300)}
    check_shared_vocab(Tok({f"t{i}": i for i in range(297)}), Tok(student))  # 3 of 300 unknown: 1%, allowed
    with pytest.raises(VocabMismatchError) as err:
        check_shared_vocab(Tok({f"t{i}": i for i in range(296)}), Tok(student))  # 4: more than 1%
    assert "0 tokens have different ids, 4 student tokens are unknown to the teacher; e.g. 't296'" in str(err.value)
    moved = {**{f"t{i}": i for i in range(300)}, "t5": 500, "t9": 501}
    with pytest.raises(VocabMismatchError, match="2 tokens have different ids, 0 student tokens are unknown to the "
                                                 "teacher; e.g. 't5'"):
        check_shared_vocab(Tok(moved), Tok(student))


def test_token_map_strategy_gathers_teacher_logits_by_token_string():
    teacher = Tok({"a": 0, "b": 1, "c": 2})
    student = Tok({"c": 0, "a": 1, "z": 2})
    mapping = token_string_map(teacher, student)
    assert mapping.tolist() == [2, 0, -1] and mapping.dtype == mx.int32
    assert token_string_map(teacher, Tok({"a": 0, "c": 2})).tolist() == [0, -1, 2]  # an unused id maps nowhere
    t = mx.array([[1.0, 2.0, 3.0]])
    aligned, _ = align_vocab_sizes(t, mx.zeros((1, 3)), "token_map", mapping)
    assert aligned[0, :2].tolist() == [3.0, 1.0]
    assert aligned[0, 2].item() < -20
    with pytest.raises(ValueError, match="unknown strategy 'project'; choose one of truncate, token_map"):
        align_vocab_sizes(t, t, "project")
    with pytest.raises(ValueError, match=r"align_vocab_sizes\(strategy='token_map'\) needs a token_map"):
        align_vocab_sizes(t, t, "token_map")
    with pytest.raises(ValueError, match="token_map has 3 entries but the student vocabulary has 5"):
        align_vocab_sizes(t, mx.zeros((1, 5)), "token_map", mapping)
    batch = mx.array(np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3))  # [batch, tokens, vocab]
    aligned, _ = align_vocab_sizes(batch, mx.zeros((2, 4, 3)), "token_map", mapping)
    assert aligned.shape == (2, 4, 3) and aligned[1, 3, :2].tolist() == [23.0, 21.0]


def test_training_loss_is_the_alpha_mix_of_sparse_kd_and_ce_on_answer_tokens():
    """kd_loss (the training step's loss) = α·sparse KD + (1-α)·CE, each over the masked tokens only."""
    from conch_dna.training.true_kd import kd_loss

    s = mx.array(logits(2, 6, 40))
    t = logits(2, 6, 40)
    order = np.argsort(-t, axis=-1)[..., :5]
    ids = mx.array(order.astype(np.int32))
    lps = mx.array(np.take_along_axis(np.log(np_softmax(t)), order, axis=-1))
    targets = mx.array(rng.integers(0, 40, (2, 6)).astype(np.int32))
    mask = mx.array(np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], np.float32))
    inputs = mx.array(rng.integers(0, 40, (2, 6)).astype(np.int32))
    model = lambda x: s if x is inputs else None  # noqa: E731 - the student sees the batch's inputs
    combined, kd, ce = kd_loss(model, inputs, targets, mask, ids, lps, temperature=2.0, alpha=0.3)
    want_kd = sparse_kd_loss(s, ids, lps, 2.0, mask)
    want_ce = compute_ce_loss(s, mx.where(mask > 0, targets, -100))
    np.testing.assert_allclose(kd.item(), want_kd.item(), rtol=1e-5)
    np.testing.assert_allclose(ce.item(), want_ce.item(), rtol=1e-5)
    np.testing.assert_allclose(combined.item(), 0.3 * want_kd.item() + 0.7 * want_ce.item(), rtol=1e-5)
    # the divergence and its β reach the sparse loss; β defaults to the symmetric 0.5
    _, jsd, _ = kd_loss(model, inputs, targets, mask, ids, lps, temperature=2.0, alpha=0.3, kind="jsd", beta=0.2)
    np.testing.assert_allclose(jsd.item(), sparse_kd_loss(s, ids, lps, 2.0, mask, "jsd", 0.2).item(), rtol=1e-5)
    _, half, _ = kd_loss(model, inputs, targets, mask, ids, lps, temperature=2.0, alpha=0.3, kind="jsd")
    np.testing.assert_allclose(half.item(), sparse_kd_loss(s, ids, lps, 2.0, mask, "jsd", 0.5).item(), rtol=1e-5)


def test_heldout_metrics_against_a_numpy_reference():
    """KL(teacher ‖ student) over the teacher's top-k + tail (padding left out), CE, top-1, per answer token."""
    from conch_dna.training.data import KDExample
    from conch_dna.training.evaluation import heldout_metrics

    vocab, k = 30, 4
    table = logits(vocab, vocab)  # the "model": next-token logits depend on the current token only
    model = lambda inputs: mx.array(table)[inputs]  # noqa: E731
    examples, ref = [], []
    for n, offset in ((9, 4), (6, 2)):
        tokens = rng.integers(0, vocab, n).astype(np.int32)
        # the first example's teacher shares the student's top-1 (agreement 1), the second's does not
        t_raw = 2 * table[tokens[offset - 1 : n - 1]] if n == 9 else logits(n - offset, vocab)
        t_logp = np.log(np_softmax(t_raw))
        ids = np.argsort(-t_logp, axis=-1)[:, :k].astype(np.int32)
        lps = np.take_along_axis(t_logp, ids, axis=-1)
        lps[0, -1], ids[0, -1] = PAD_LOGPROB, 0  # a padded entry: counted on neither side
        examples.append(KDExample(tokens, offset, ids, lps.astype(np.float16)))
        for row in range(n - offset):
            s_logp = np.log(np_softmax(table[tokens[offset - 1 + row]]))
            keep = lps[row] > PAD_LOGPROB
            t = np.exp(lps[row][keep].astype(np.float16).astype(np.float64))
            s = np.exp(s_logp[ids[row][keep]])
            p, q = np.append(t, 1 - t.sum()), np.append(s, 1 - s.sum())
            ref.append((np_kl(p, q), -s_logp[tokens[offset + row]], s_logp.argmax() == ids[row, 0]))
    m = heldout_metrics(model, examples)
    kl, ce, agree = (np.mean([r[i] for r in ref]) for i in range(3))
    assert m.tokens == len(ref)
    np.testing.assert_allclose([m.kl, m.ce, m.agreement], [kl, ce, agree], rtol=2e-3, atol=1e-5)
    assert agree > 0.3  # a wrong top-1 or a wrong average would show


def test_heldout_metrics_name_what_they_cannot_measure_and_take_a_single_token():
    from conch_dna.training.data import KDExample
    from conch_dna.training.evaluation import heldout_metrics

    table = logits(30, 30)
    model = lambda inputs: mx.array(table)[inputs]  # noqa: E731
    with pytest.raises(ValueError, match="no held-out examples to evaluate on"):
        heldout_metrics(model, [])
    ids, lps = np.zeros((1, 4), np.int32), np.full((1, 4), -1.5, np.float16)
    one = KDExample(np.array([3, 4, 5], np.int32), 2, ids, lps)  # one answer token
    assert heldout_metrics(model, [one]).tokens == 1
    with pytest.raises(ValueError, match="hold no answer token inside the window"):  # an empty answer
        heldout_metrics(model, [KDExample(np.array([3, 4, 5], np.int32), 3, ids[:0], lps[:0])])

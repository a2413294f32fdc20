"""Compact teacher targets: a token's top-k ids and log-probs in about a third of the raw bytes.

The raw form is 6 bytes a slot (int32 id, float16 log-prob): 387.5 bytes per answer token at k = 64.
Here each row's ids are sorted and stored as gaps (one byte plane per byte of the gap, so the mostly
zero high planes compress to nothing); log-probs are quantized to 8 bits on a square-root scale of
-log p (fine near p = 1 where the mass is, coarse deep in the tail); the whole is LZMA2-packed
(raw, with a 1 MiB dictionary: a few MiB to encode, not the hundreds of the xz presets). Two
things are kept so that nothing a loss or a metric reads moves: each row's tail 1 - Σp (its log as
float16: a relative error of 1e-3, where rounding 64 log-probs would swing a peaked row's tail by
more than itself; at T = 2 that tail bucket weighs) and which slot was the teacher's top-1 (the CE
target of on-policy answers, and the top-1 agreement).
bench/kd_step.py prints the bytes per token of the cache it builds and what decoding costs the
trained student.
"""

from __future__ import annotations

import lzma

from conch_dna.training.losses import PAD_LOGPROB

import numpy as np

MAGIC = b"CONCHTK1"  # gaps in byte planes, sqrt-scale 8-bit log-probs, row mass and top-1, LZMA2
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20}]
DEPTH = -PAD_LOGPROB  # a log-prob at or below padding's (p < 1e-13) is stored as padding
LEVELS = 255
_GAP_PLANES = 3  # bytes of a gap: ids below 2**24
_TINY = 1e-30  # the tail of a row whose top k hold all the mass


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def encode_topk(ids: np.ndarray, logprobs: np.ndarray) -> bytes:
    """The packed bytes of [n, k] top-k ids (best first) and their log-probs."""
    ids = np.asarray(ids, np.int64)
    logprobs = np.asarray(logprobs, np.float64)
    n, k = ids.shape
    if not 1 <= k <= np.iinfo(np.uint16).max:
        raise ValueError(f"top-k width must be 1..65535, got {k}")
    if n and (ids.min() < 0 or ids.max() >= 1 << (8 * _GAP_PLANES)):
        raise ValueError(f"top-k ids must be in [0, 2**{8 * _GAP_PLANES}), got {ids.min()}..{ids.max()}")
    order = np.argsort(ids, axis=1, kind="stable")
    gaps = np.diff(np.take_along_axis(ids, order, axis=1), axis=1, prepend=0)
    planes = [((gaps >> (8 * b)) & 0xFF).astype(np.uint8) for b in range(_GAP_PLANES)]
    depth = np.clip(-np.take_along_axis(logprobs, order, axis=1), 0.0, DEPTH)
    levels = np.round(np.sqrt(depth / DEPTH) * LEVELS).astype(np.uint8)
    top1 = np.argsort(order, axis=1)[:, 0].astype(np.uint16)  # where slot 0 went in the sorted row
    tail = -np.expm1(_logsumexp(np.maximum(logprobs, -DEPTH))) if n else np.zeros(0)
    log_tail = np.log(np.maximum(tail, _TINY)).astype(np.float16)
    header = MAGIC + np.array([n, k], np.uint32).tobytes()
    body = b"".join(p.tobytes() for p in planes) + levels.tobytes() + top1.tobytes() + log_tail.tobytes()
    return header + lzma.compress(body, format=lzma.FORMAT_RAW, filters=_FILTERS)


def decode_topk(packed: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n, k], log-probs float32 [n, k]) of encode_topk's bytes, best first, the top-1 exact.

    float32, not float16: near p = 1 float16 rounds a log-prob by more than a peaked row's whole tail.

    Raises ValueError for bytes that are not encode_topk's (another format, torn or truncated).
    """
    if packed[: len(MAGIC)] != MAGIC or len(packed) < len(MAGIC) + 8:
        raise ValueError("not a packed top-k (no CONCHTK1 header)")
    n, k = (int(v) for v in np.frombuffer(packed[len(MAGIC) : len(MAGIC) + 8], np.uint32))
    if not 1 <= k <= np.iinfo(np.uint16).max:
        raise ValueError(f"packed top-k of width {k}: not a width encode_topk writes")
    try:
        body = lzma.decompress(packed[len(MAGIC) + 8 :], format=lzma.FORMAT_RAW, filters=_FILTERS)
    except lzma.LZMAError as exc:
        raise ValueError(f"packed top-k of {n}x{k} does not unpack: {exc}") from None
    expected = (_GAP_PLANES + 1) * n * k + 4 * n
    if len(body) != expected:
        raise ValueError(f"packed top-k of {n}x{k} should unpack to {expected} bytes, got {len(body)}")
    cells = n * k
    gaps = sum(np.frombuffer(body, np.uint8, cells, b * cells).astype(np.int64) << (8 * b)
               for b in range(_GAP_PLANES)).reshape(n, k)
    at = _GAP_PLANES * cells
    levels = np.frombuffer(body, np.uint8, cells, at).reshape(n, k)
    top1 = np.frombuffer(body, np.uint16, n, at + cells).astype(np.int64)
    log_tail = np.frombuffer(body, np.float16, n, at + cells + 2 * n).astype(np.float64)
    ids = np.cumsum(gaps, axis=1)
    logprobs = -((levels / LEVELS) ** 2) * DEPTH
    if n:
        logprobs += (np.log1p(-np.exp(log_tail)) - _logsumexp(logprobs))[:, None]  # the tail as it was
        logprobs[levels == LEVELS] = PAD_LOGPROB  # padding stays padding (losses test <= PAD_LOGPROB)
    rank = np.argsort(-logprobs, axis=1, kind="stable")
    rows = np.arange(n)[:, None]
    rank = np.concatenate([top1[:, None], rank[rank != top1[:, None]].reshape(n, k - 1)], axis=1)
    return ids[rows, rank].astype(np.int32), logprobs[rows, rank].astype(np.float32)

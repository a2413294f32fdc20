"""Data-parallel runs on MLX's distributed engine: the group a process belongs to, which share of a list
a rank takes, and the few collectives a run needs, each watched by a timeout.

A run is data-parallel when it was started by `mlx.launch` (ring over Ethernet or Thunderbolt, MPI,
JACCL); started alone, a process is rank 0 of 1 and nothing here communicates. Every rank computes its
share (`shard`), then everyone gets everyone's (`gather`), so each trace costs one rank's work and every
rank ends with the same result. A collective that does not return within the timeout (a rank that
hangs; one that dies fails its peers' collectives at once) ends the process after `on_timeout` has
said why: the run is recorded as failed and its last checkpoint kept (conch_dna.lifecycle.cycle).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np

TIMEOUT_S = 300.0  # a collective slower than this means a rank is gone
EXIT_RANK_FAILED = 75  # the exit status of a process whose peer failed


class RankFailure(RuntimeError):
    """A peer died or hung during a collective; the message says which collective."""


_group = None
_timeout = TIMEOUT_S
_on_timeout: Callable[[str], None] | None = None


def group():
    """This process's group (size 1 unless started by mlx.launch)."""
    global _group
    if _group is None:
        import mlx.core as mx

        _group = mx.distributed.init(strict=False) if mx.distributed.is_available() else None
    return _group


def rank() -> int:
    g = group()
    return g.rank() if g is not None else 0


def size() -> int:
    g = group()
    return g.size() if g is not None else 1


def is_leader() -> bool:
    """Rank 0, which alone writes checkpoints, versions, the manifest and the run record."""
    return rank() == 0


def configure(timeout_s: float = TIMEOUT_S, on_timeout: Callable[[str], None] | None = None) -> None:
    """The collectives' timeout, and what to do before the process ends when one passes it."""
    global _timeout, _on_timeout
    _timeout, _on_timeout = timeout_s, on_timeout


@contextmanager
def collective(what: str):
    """Run a collective under the timeout; a failed one raises RankFailure naming it."""
    if size() == 1:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        if not done.wait(_timeout):
            reason = f"rank {rank()} waited {_timeout:.0f} s for {what}: a rank did not answer"
            print(f"conch: {reason}", file=sys.stderr, flush=True)
            if _on_timeout is not None:
                try:
                    _on_timeout(reason)
                finally:
                    os._exit(EXIT_RANK_FAILED)
            os._exit(EXIT_RANK_FAILED)

    watcher = threading.Thread(target=watch, name="conch-collective-watch", daemon=True)
    watcher.start()
    try:
        yield
    except RuntimeError as exc:  # the ring fails pending work when a peer's socket closes
        raise RankFailure(f"{what} failed on rank {rank()}: a rank is gone ({exc})") from None
    finally:
        done.set()


def shard(items: list, of: int | None = None) -> list:
    """This rank's share of a list: items rank, rank + size, ... (every item goes to one rank)."""
    return list(items[rank()::size()]) if of is None else list(items[rank()::of])


def unshard(shares: list[list]) -> list:
    """The list shard() cut, put back in its order from every rank's share."""
    out = [None] * sum(len(s) for s in shares)
    for r, share in enumerate(shares):
        out[r::len(shares)] = share
    return out


def all_sum(values, what: str = "a sum") -> np.ndarray:
    """Element-wise sum over the ranks of a float64 vector."""
    values = np.asarray(values, np.float64)
    if size() == 1:
        return values
    import mlx.core as mx

    with collective(what):
        out = mx.distributed.all_sum(mx.array(values.astype(np.float32)), stream=mx.cpu)
        mx.eval(out)
        return np.array(out, np.float64)


def gather_bytes(blob: bytes, what: str = "a gather") -> list[bytes]:
    """Every rank's bytes, in rank order (lengths differ: each is padded to the longest)."""
    if size() == 1:
        return [blob]
    import mlx.core as mx

    with collective(what):
        lengths = mx.distributed.all_gather(mx.array([len(blob)], mx.int64), stream=mx.cpu)
        mx.eval(lengths)
        longest = int(np.array(lengths).max())
        padded = np.zeros(max(longest, 1), np.uint8)
        padded[: len(blob)] = np.frombuffer(blob, np.uint8)
        gathered = mx.distributed.all_gather(mx.array(padded), stream=mx.cpu)
        mx.eval(gathered)
    rows = np.array(gathered).reshape(size(), -1)
    return [rows[r, : int(n)].tobytes() for r, n in enumerate(np.array(lengths))]


BROADCAST_CHUNK = 8 << 20  # bytes a broadcast moves per collective: what it holds beyond the message itself


def broadcast_bytes(blob: bytes, what: str = "a broadcast", chunk: int = BROADCAST_CHUNK) -> bytes | bytearray:
    """Rank 0's bytes on every rank (the others pass b""), sent in chunks: each rank holds the message and one
    chunk, never the padded copies of every rank's part that a gather would."""
    if size() == 1:
        return blob
    import mlx.core as mx

    def summed(values: np.ndarray) -> np.ndarray:  # rank 0's values plus everyone else's zeros
        out = mx.distributed.all_sum(mx.array(values if is_leader() else np.zeros_like(values)), stream=mx.cpu)
        mx.eval(out)
        return np.array(out)

    with collective(what):
        header = summed(np.frombuffer(struct.pack("<Q", len(blob)), np.uint8).copy())
        length = struct.unpack("<Q", header.astype(np.uint8).tobytes())[0]
        if is_leader():
            for start in range(0, length, chunk):
                summed(np.frombuffer(blob, np.uint8, min(chunk, length - start), start))
            return blob
        out = bytearray(length)
        view = np.frombuffer(out, np.uint8)
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            view[start:stop] = summed(np.zeros(stop - start, np.uint8))
    return out


def gather(share: list, encode: Callable[[list], bytes], decode: Callable[[bytes], list], what: str) -> list:
    """Every rank's share of a sharded list, decoded and put back in the list's order."""
    if size() == 1:
        return share
    return unshard([decode(b) for b in gather_bytes(encode(share), what)])


def broadcast_tree(tree, what: str = "the weights"):
    """Rank 0's arrays in every rank (the same tree structure everywhere): an all-sum of rank 0's values
    and everyone else's zeros."""
    if size() == 1:
        return tree
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    flat = tree_flatten(tree)
    with collective(what):
        summed = [(k, mx.distributed.all_sum(v if is_leader() else mx.zeros_like(v), stream=mx.cpu)) for k, v in flat]
        mx.eval([v for _, v in summed])
    return tree_unflatten(summed)


def agree(flag: bool, what: str = "whether to stop") -> bool:
    """True on every rank when it is true on any (a stop asked on one rank stops them all)."""
    return bool(all_sum([1.0 if flag else 0.0], what)[0] > 0)


def encode_arrays(items: list[dict]) -> bytes:
    """A list of dicts of numpy arrays, ints and None as bytes (np.savez; no pickle)."""
    arrays = {}
    for i, item in enumerate(items):
        for k, v in item.items():
            if v is None:
                continue
            arrays[f"{i}/{k}"] = np.asarray(v)
    arrays["__count__"] = np.array(len(items))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_arrays(blob: bytes) -> list[dict]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        items = [{} for _ in range(int(data["__count__"]))]
        for key in data.files:
            if key != "__count__":
                i, _, name = key.partition("/")
                items[int(i)][name] = data[key]
    return items


def wait_all(what: str = "the ranks") -> None:
    """A barrier (a sum of nothing)."""
    if size() > 1:
        all_sum([0.0], what)

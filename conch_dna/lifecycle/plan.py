"""A data-parallel run's plan, as rank 0 sends it to the other ranks: the settings, and the traces packed as
the store keeps them (chats as JSON, top-k as int32 ids and float16 log-probs), not as JSON numbers.

A trace's top-k as JSON text is about six times its packed size (about 335 KB for a 256-token trace), and
a gather pads every rank's part to the longest: a few thousand traces cost gigabytes on every rank. Packed,
and broadcast in chunks (conch_dna.system.distributed.broadcast_bytes), a plan costs each rank about the
traces' size in the store. The held-out traces of a group ("established") travel once, as row ids.
"""

from __future__ import annotations

import json
import struct

import numpy as np

_HEAD = struct.Struct("<Q")


def encode_plan(plan: dict) -> bytes:
    """The plan as bytes: a JSON head (settings, chats, where each top-k lies) and the top-k arrays' bytes."""
    blobs: list[bytes] = []
    offset = 0

    def pack(traces: list[dict]) -> list[dict]:
        nonlocal offset
        out = []
        for t in traces:
            entry = {k: v for k, v in t.items() if k != "topk"}
            topk = t.get("topk")
            if topk is not None:
                ids = np.ascontiguousarray(topk["token_ids"], np.int32)
                lps = np.ascontiguousarray(topk["logprobs"], np.float16)
                entry["topk"] = {"tokenizer": topk.get("tokenizer"), "shape": list(ids.shape), "at": offset}
                blobs.extend((ids.tobytes(), lps.tobytes()))
                offset += ids.nbytes + lps.nbytes
            out.append(entry)
        return out

    groups = plan.get("groups")
    head = {**{k: v for k, v in plan.items() if k not in ("train", "held", "groups")},
            "train": pack(plan["train"]), "held": pack(plan["held"]),
            "groups": {name: [t["rowid"] for t in traces] for name, traces in groups.items()} if groups else None}
    text = json.dumps(head, default=_plain).encode()
    return _HEAD.pack(len(text)) + text + b"".join(blobs)


def decode_plan(blob: bytes) -> dict:
    """encode_plan's plan again; the top-k arrays are views of `blob` (read-only, not copied)."""
    (n,) = _HEAD.unpack_from(blob)
    head = json.loads(blob[_HEAD.size:_HEAD.size + n])
    data = memoryview(blob)[_HEAD.size + n:]

    def unpack(traces: list[dict]) -> list[dict]:
        for t in traces:
            topk = t.get("topk")
            if topk is not None:
                rows, k = topk["shape"]
                at, size = topk["at"], rows * k
                ids = np.frombuffer(data, np.int32, size, at).reshape(rows, k)
                lps = np.frombuffer(data, np.float16, size, at + 4 * size).reshape(rows, k)
                t["topk"] = {"token_ids": ids, "logprobs": lps, "tokenizer": topk["tokenizer"]}
        return traces

    head["train"], head["held"] = unpack(head["train"]), unpack(head["held"])
    if head.get("groups"):
        by_rowid = {t["rowid"]: t for t in head["held"]}
        head["groups"] = {name: [by_rowid[r] for r in rowids] for name, rowids in head["groups"].items()}
    return head


def _plain(value):
    from pathlib import Path

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} in a run's plan")

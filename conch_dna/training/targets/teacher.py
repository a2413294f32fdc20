"""Teacher targets: the teacher's top-k log-probs for every answer token, cached on disk.

A target costs one teacher forward pass over prompt + answer; the result is stored as a small
packed file (conch_dna.training.targets.topk_codec) keyed by a hash of the teacher id, k and the token ids,
so the same trace never costs a teacher pass twice. When a prompt has no answer yet, the teacher
writes one first (greedy), and that answer is cached too.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from conch_dna.models.chat import encode_chat, prompt_tokens
from conch_dna.models.loading import free_memory, load_model
from conch_dna.system.fsutil import atomic_write, atomic_write_json, private_dir
from conch_dna.training.data import KDExample, window_cut
from conch_dna.training.hidden import hidden_states
from conch_dna.training.losses import PAD_LOGPROB
from conch_dna.training.targets.topk_codec import decode_topk, encode_topk

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file, save_file

TARGET_SUFFIX = ".topk"
LEGACY_SUFFIX = ".safetensors"
HIDDEN_SUFFIX = ".hidden"  # the teacher's hidden states at mapped layers: float16 safetensors


class TeacherCache:
    """One file per (teacher, k, tokens): its top-k ids and log-probs, packed (topk_codec, `.topk`).

    Caches written before the packed format (`.safetensors`: `ids` int32 [n, k], `logprobs`
    float16 [n, k]) still read; a target is only ever written packed.
    """

    def __init__(self, root: str | Path):
        self.root = private_dir(root)

    @staticmethod
    def key(teacher_id: str, tokens, offset: int, k: int) -> str:
        h = hashlib.sha256(f"{teacher_id}\0{k}\0{offset}\0".encode())
        h.update(np.asarray(tokens, np.int32).tobytes())
        return h.hexdigest()

    @staticmethod
    def answer_key(teacher_id: str, prompt_tokens, max_tokens: int) -> str:
        """Key of the teacher's greedy answer to a prompt (answers depend on the token budget)."""
        h = hashlib.sha256(f"answer\0{teacher_id}\0{max_tokens}\0".encode())
        h.update(np.asarray(prompt_tokens, np.int32).tobytes())
        return h.hexdigest()

    @staticmethod
    def hidden_key(teacher_id: str, tokens, offset: int, layers: list[int]) -> str:
        h = hashlib.sha256(f"hidden\0{teacher_id}\0{','.join(map(str, layers))}\0{offset}\0".encode())
        h.update(np.asarray(tokens, np.int32).tobytes())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{TARGET_SUFFIX}"

    def hidden_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{HIDDEN_SUFFIX}"

    def get_hidden(self, key: str) -> np.ndarray | None:
        path = self.hidden_path(key)
        try:
            hidden = load_file(str(path))["hidden"]
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a torn or foreign file is a miss
            path.unlink(missing_ok=True)
            return None
        _touch(path)
        return hidden

    def put_hidden(self, key: str, hidden: np.ndarray) -> np.ndarray:
        path = self.hidden_path(key)
        private_dir(path.parent)
        hidden = hidden.astype(np.float16)
        atomic_write(path, lambda tmp: save_file({"hidden": hidden}, tmp))
        return hidden

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids int32 [n, k], log-probs float32 [n, k], float16 from a legacy file) of a target, or None."""
        for path, read in ((self.path(key), _read_packed), (self.path(key).with_suffix(LEGACY_SUFFIX), _read_legacy)):
            try:
                target = read(path)
            except FileNotFoundError:
                continue
            except Exception:  # noqa: BLE001 - a torn or foreign file is a miss, not a crash
                path.unlink(missing_ok=True)
                continue
            _touch(path)
            return target
        return None

    def put(self, key: str, ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store a target packed; returns it as get() will, so a first run trains on what a rerun reads."""
        packed = encode_topk(ids, logprobs)
        path = self.path(key)
        private_dir(path.parent)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(packed))
        return decode_topk(packed)

    def answer_path(self, key: str) -> Path:
        return self.root / "answers" / f"{key}.json"

    def get_answer(self, key: str) -> str | None:
        try:
            answer = json.loads(self.answer_path(key).read_text())["answer"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        _touch(self.answer_path(key))
        return answer

    def put_answer(self, key: str, answer: str) -> None:
        private_dir(self.answer_path(key).parent)
        atomic_write_json(self.answer_path(key), {"answer": answer})

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last used, size, path) of every cached file."""
        out = []
        for path in self.root.rglob("*"):
            if path.suffix in (TARGET_SUFFIX, LEGACY_SUFFIX, HIDDEN_SUFFIX, ".json") and not path.name.startswith("."):
                try:
                    st = path.stat()
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                out.append((st.st_mtime, st.st_size, path))
        return out

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, max_bytes: int) -> int:
        """Delete the least recently used entries until the cache holds at most max_bytes; returns
        how many it deleted. An evicted target only costs a teacher pass again, if ever needed."""
        entries = sorted(self.entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        deleted = 0
        for _, size, path in entries:
            if total <= max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            deleted += 1
        return deleted


def _read_packed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return decode_topk(path.read_bytes())


def _read_legacy(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = load_file(str(path))
    return data["ids"], data["logprobs"]


def _touch(path: Path) -> None:
    """Mark a cache entry as just used (its mtime orders eviction: atime is often not kept)."""
    try:
        os.utime(path)
    except OSError:
        pass


def topk_logprobs(logits: mx.array, k: int, vocab_limit: int | None = None):
    """Top-k (ids, log-probs) per row, best first, among the first vocab_limit ids.

    Log-probs are normalised over the teacher's whole vocabulary, so the mass outside the top k
    (padding ids included) stays visible as the tail.
    """
    logp = logits.astype(mx.float32)
    logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
    candidates = logp[..., :vocab_limit] if vocab_limit else logp
    k = min(k, candidates.shape[-1])
    ids = mx.argpartition(-candidates, kth=k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(candidates, ids, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)


class TeacherScorer:
    """Loads the teacher on first use; `release()` frees it before the student trains."""

    def __init__(self, teacher_model_id: str, cache: TeacherCache, top_k: int = 64,
                 vocab_limit: int | None = None, max_answer_tokens: int = 256, max_seq_length: int | None = None):
        self.teacher_model_id = teacher_model_id
        self.cache = cache
        self.top_k = top_k
        self.vocab_limit = vocab_limit
        self.max_answer_tokens = max_answer_tokens
        self.max_seq_length = max_seq_length  # the training window: a longer prompt is cut from the left
        self.hidden_layers: list[int] | None = None  # teacher blocks whose outputs examples carry
        self.forward_passes = 0
        self.generated_answers = 0
        self._model = None
        self._tokenizer = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self):
        if self._model is None:
            self._model, self._tokenizer = load_model(self.teacher_model_id)
        return self._model, self._tokenizer

    def release(self) -> None:
        self._model = None
        self._tokenizer = None
        free_memory()

    def complete(self, messages: list[dict], tokenizer, tools: list[dict] | None = None) -> list[dict]:
        """The chat with the teacher's answer last: the given one, or one it writes now (greedy; a
        tool call it writes stays the text it wrote, so the tokens trained are the tokens it chose).

        `tokenizer` shares the teacher's ids (the student's), so a cached answer needs no teacher.
        """
        if messages[-1].get("role") == "assistant":
            return messages
        from mlx_lm import generate

        prompt = prompt_tokens(tokenizer, messages, tools)
        key = self.cache.answer_key(self.teacher_model_id, prompt, self.max_answer_tokens)
        answer = self.cache.get_answer(key)
        if answer is None:
            model, teacher_tokenizer = self._load()
            answer = generate(model, teacher_tokenizer, prompt=prompt,
                              max_tokens=self.max_answer_tokens, verbose=False)
            self.generated_answers += 1
            self.cache.put_answer(key, answer)
        return [*messages, {"role": "assistant", "content": answer}]

    def targets(self, tokens: list[int], offset: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids and log-probs of the teacher for each answer token, from cache or one pass
        (which also caches the hidden states when hidden_layers is set)."""
        key = self.cache.key(self.teacher_model_id, tokens, offset, self.top_k)
        if (cached := self.cache.get(key)) is not None:
            return cached
        return self._score(tokens, offset)[0]

    def cached_hidden(self, tokens: list[int], offset: int) -> np.ndarray | None:
        """The teacher's cached outputs of the hidden_layers blocks at the answer positions (the positions
        that predict each answer token), float16 [n - offset, layers, width], or None."""
        return self.cache.get_hidden(self.cache.hidden_key(self.teacher_model_id, tokens, offset, self.hidden_layers))

    def scored(self, tokens: list[int], offset: int):
        """(top-k targets, hidden states or None without hidden_layers) from cache, or both from one pass."""
        targets = self.cache.get(self.cache.key(self.teacher_model_id, tokens, offset, self.top_k))
        hidden = self.cached_hidden(tokens, offset) if self.hidden_layers else None
        if targets is None or (self.hidden_layers and hidden is None):
            return self._score(tokens, offset)
        return targets, hidden

    def _score(self, tokens: list[int], offset: int):
        """One teacher pass: (top-k targets, hidden states or None), both cached."""
        model, _ = self._load()
        inputs = mx.array(tokens[:-1])[None]
        hidden = None
        if self.hidden_layers:
            logits, states = hidden_states(model, inputs, self.hidden_layers)
            key = self.cache.hidden_key(self.teacher_model_id, tokens, offset, self.hidden_layers)
            hidden = self.cache.put_hidden(key, np.array(states[0, offset - 1 :].astype(mx.float32)))
        else:
            logits = model(inputs)
        ids, logprobs = topk_logprobs(logits[0, offset - 1 :], self.top_k, self.vocab_limit)
        mx.eval(ids, logprobs)
        self.forward_passes += 1
        key = self.cache.key(self.teacher_model_id, tokens, offset, self.top_k)
        return self.cache.put(key, np.array(ids, np.int32), np.array(logprobs, np.float32)), hidden

    def example(self, messages: list[dict], tokenizer, topk: dict | None = None,
                fingerprint: str | None = None, tools: list[dict] | None = None) -> KDExample:
        """A KD example for a chat offering `tools` (answered by the teacher if it has no answer yet).

        `topk` captured with the trace is used as is when it was made with this tokenizer
        (`fingerprint`) and covers every answer token; otherwise the teacher scores the chat.
        """
        tokens, offset = encode_chat(tokenizer, self.complete(messages, tokenizer, tools), tools)
        if self.max_seq_length:  # the teacher sees what the student will: its memory stays bounded too
            cut = window_cut(len(tokens), offset, self.max_seq_length)
            tokens, offset = tokens[cut:], offset - cut
        captured = _fit_topk(topk, fingerprint, tokens[offset:], self.top_k, self.vocab_limit)
        if not captured:
            return self.token_example(tokens, offset)
        ids, logprobs = captured  # a capture cut short by max_tokens covers a prefix: the example ends with it
        tokens = tokens[: offset + len(ids)]
        # a capture has logits only; the teacher is not run for the hidden states a trace lacks, or
        # capturing would save no pass: the hidden-state loss skips such examples
        hidden = self.cached_hidden(list(tokens), offset) if self.hidden_layers else None
        return KDExample(np.asarray(tokens, np.int32), offset, ids, logprobs, hidden=hidden)

    def token_example(self, tokens: list[int], offset: int, on_policy: bool = False) -> KDExample:
        """A KD example of token ids whose answer starts at `offset`, scored by the teacher in the window.

        Answer tokens past the window would never be trained on: the teacher skips them too.
        """
        if self.max_seq_length:
            cut = window_cut(len(tokens), offset, self.max_seq_length)
            tokens, offset = tokens[cut:][: self.max_seq_length + 1], offset - cut
        (ids, logprobs), hidden = self.scored(tokens, offset)
        return KDExample(np.asarray(tokens, np.int32), offset, ids, logprobs, on_policy, hidden)


# Rows a capture may lack: the chat template's own text after the answer's EOS (ChatML's "\n").
# A capture cut short by max_tokens lacks the EOS row too: its example ends at the last captured
# token, so the student is never told "EOS, certain" where the teacher went on.
_TEMPLATE_TAIL = 1
_CUT = _TEMPLATE_TAIL + 1


def _fit_topk(topk: dict | None, fingerprint: str | None, answer_tokens, k: int, vocab_limit: int | None = None):
    """Captured top-k as (ids, logprobs) of width k, or None if it does not fit this chat.

    The rows returned cover every answer token, or, for a capture cut short by max_tokens (no EOS
    row and no template tail), the answer's first rows: the caller trains on that prefix.

    A capture fits when it was made with this tokenizer and row i holds answer token i (so a
    re-tokenised answer that differs from the generated tokens is caught). The row for the chat
    template's fixed text after the answer's EOS (at most one) is that token at log-prob 0.
    Narrower captures are padded with id 0 at PAD_LOGPROB: a bucket the teacher
    gives no mass, which keeps every example in a batch the same width.
    """
    if not topk or topk.get("tokenizer") != fingerprint:
        return None
    ids = np.asarray(topk["token_ids"], np.int32)
    lps = np.asarray(topk["logprobs"], np.float16)
    answer_tokens = np.asarray(answer_tokens, np.int32)
    n, rows = len(answer_tokens), ids.shape[0] if ids.ndim == 2 else -1
    if ids.ndim != 2 or rows == 0 or not 0 <= n - rows <= _CUT:
        return None
    if vocab_limit is not None:  # the teacher's padded rows (7B's 152064 vs 151936): mass to the tail
        outside = ids >= vocab_limit
        ids, lps = np.where(outside, 0, ids), np.where(outside, PAD_LOGPROB, lps).astype(np.float16)
    if not (ids == answer_tokens[:rows, None]).any(axis=1).all():
        return None
    if 0 < n - rows <= _TEMPLATE_TAIL:
        tail_ids = np.zeros((n - rows, ids.shape[1]), np.int32)
        tail_ids[:, 0] = answer_tokens[rows:]
        tail_lps = np.full((n - rows, ids.shape[1]), PAD_LOGPROB, np.float16)
        tail_lps[:, 0] = 0.0
        ids, lps = np.concatenate([ids, tail_ids]), np.concatenate([lps, tail_lps])
    ids, lps = ids[:, :k], lps[:, :k]
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)))
        lps = np.pad(lps, ((0, 0), (0, pad)), constant_values=PAD_LOGPROB)
    return ids, lps

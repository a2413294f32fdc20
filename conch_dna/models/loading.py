"""Loading teacher and student models through mlx_lm.load, with errors a person can act on."""

from __future__ import annotations

import gc
import hashlib
import json
import re
from pathlib import Path

DEFAULT_TEACHER = "mlx-community/Qwen2.5-7B-Instruct-4bit"  # the EGO
DEFAULT_STUDENT = "mlx-community/Qwen2.5-3B-Instruct-4bit"  # the CORTEX neurons' base
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """A model id or path that cannot be loaded; the message says why."""


def check_model_ref(model_id: str) -> None:
    """Fail early for a local path that does not exist; hub ids are left to mlx_lm.load."""
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {model_id} has no config.json")
        return
    if not _HUB_ID.match(model_id) or model_id.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path does not exist: {model_id}")


def _ref(model_id: str) -> str:
    path = Path(model_id).expanduser()
    return str(path) if path.exists() else model_id


def load_model(model_id: str, adapter_path: str | Path | None = None):
    """mlx_lm.load(model_id, adapter_path=...) -> (model, tokenizer), or ModelLoadError."""
    from mlx_lm import load

    check_model_ref(model_id)
    try:
        return load(_ref(model_id), adapter_path=str(adapter_path) if adapter_path else None)
    except Exception as exc:  # noqa: BLE001 - one clear message whatever mlx_lm raised
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load model {model_id!r}: {first_line}") from exc


def free_memory() -> None:
    """Return a released model's memory: its arrays go with the last reference, MLX's cache here."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def load_tokenizer_only(model_id: str):
    """The tokenizer of a model, without its weights (mlx-lm's own loader)."""
    from mlx_lm.utils import _download, load_tokenizer

    check_model_ref(model_id)
    try:
        return load_tokenizer(_download(_ref(model_id)))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not load the tokenizer of {model_id!r}: {exc}") from exc


def model_dims(model_id: str) -> tuple[int, int]:
    """(blocks, hidden width) of a model, from its config.json, without loading its weights."""
    from mlx_lm.utils import _download

    path = Path(_download(_ref(model_id))) / "config.json"
    try:
        config = json.loads(path.read_text())
        return int(config["num_hidden_layers"]), int(config["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"could not read the depth and width of {model_id!r} from {path}: {exc}") from None


def output_vocab_size(model) -> int:
    """Rows of the model's output layer (mlx-lm models keep their config in .args)."""
    return int(model.args.vocab_size)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary: same fingerprint, same token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


class VocabMismatchError(ValueError):
    """Teacher and student tokenizers do not give the same ids to the same tokens."""


def check_shared_vocab(teacher_tokenizer, student_tokenizer) -> None:
    """Raise VocabMismatchError unless every token both tokenizers know has the same id in both."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    differ = [tok for tok, i in s_vocab.items() if tok in t_vocab and t_vocab[tok] != i]
    missing = [tok for tok in s_vocab if tok not in t_vocab]
    if differ or len(missing) > 0.01 * len(s_vocab):
        example = (differ or missing)[0]
        raise VocabMismatchError(
            f"teacher and student tokenizers do not share token ids ({len(differ)} tokens have "
            f"different ids, {len(missing)} student tokens are unknown to the teacher; e.g. "
            f"{example!r}): truncating would pair unrelated tokens. Use a student from the "
            f"teacher's family, or the 'token_map' strategy."
        )

"""GGUF files (Ollama, LM Studio, llama.cpp) become mlx-lm model directories.

    conch models import SmolLM2-135M-Instruct.Q4_1.gguf -o ~/models/smollm2

The directory holds config.json, model.safetensors, tokenizer.json and tokenizer_config.json (with
the chat template and special tokens from the file's metadata), so plain `mlx_lm.load(DIR)` loads it
exactly as it loads an `mlx-community/...` model. Weights are read by MLX's own GGUF loader, which
turns Q4_0, Q4_1 and Q8_0 blocks into MLX's affine quantization (group 32); `dtype="keep"` keeps
them quantized, "float32"/"float16" dequantizes them. llama.cpp stores the Q and K projections of
llama models permuted for its interleaved RoPE; they are permuted back (row permutations commute
with the per-row quantization groups), so the directory matches a Hugging Face conversion and an
adapter trained on it fits the hub's model of the same name.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from conch_dna.fsutil import atomic_write_json

import mlx.core as mx
import numpy as np

ARCHITECTURES = ("llama", "qwen2")
TENSOR_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
_OTHER_TYPES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
                14: "Q6_K", 15: "Q8_K", 30: "BF16"}
DTYPES = ("float32", "float16", "keep")
# llama.cpp's tensor names -> mlx-lm's (Hugging Face's) for the llama family of blocks.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# Pre-tokenizer regexes by `tokenizer.ggml.pre`, as llama.cpp applies them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFImportError(ValueError):
    """A GGUF file this importer cannot turn into an mlx-lm model; the message names what."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    type_name: str


def read_tensor_infos(path: Path) -> list[GGUFTensor]:
    """The tensor table of a GGUF file (names, shapes, storage types), read from its header.

    MLX's loader converts what it can without saying what the file held; this tells us, so an
    unsupported storage type is refused by name instead of imported silently.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFImportError(f"{path} is not a GGUF file (no GGUF magic)")
        version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise GGUFImportError(f"{path}: GGUF version {version} is too old (2 or later)")
        for _ in range(n_kv):
            _skip_string(f)
            _skip_value(f, struct.unpack("<I", f.read(4))[0])
        tensors = []
        for _ in range(n_tensors):
            name = _read_string(f)
            (n_dims,) = struct.unpack("<I", f.read(4))
            shape = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
            type_id, _offset = struct.unpack("<IQ", f.read(12))
            type_name = TENSOR_TYPES.get(type_id) or _OTHER_TYPES.get(type_id, f"type {type_id}")
            tensors.append(GGUFTensor(name, tuple(shape), type_name))
    return tensors


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _read_string(f) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _skip_string(f) -> None:
    (n,) = struct.unpack("<Q", f.read(8))
    f.seek(n, 1)


def _skip_value(f, value_type: int) -> None:
    if value_type in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[value_type], 1)
    elif value_type == 8:
        _skip_string(f)
    elif value_type == 9:
        item_type, count = struct.unpack("<IQ", f.read(12))
        if item_type in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[item_type] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item_type)
    else:
        raise GGUFImportError(f"unknown GGUF metadata value type {value_type}")


def _scalar(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    if value is None:
        raise GGUFImportError(f"the GGUF metadata has no {key!r}")
    return value.item() if isinstance(value, mx.array) else value


def model_config(meta: dict, tensor_names: set[str]) -> dict:
    """config.json for mlx-lm from the GGUF metadata of a llama or qwen2 model."""
    arch = _scalar(meta, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFImportError(f"architecture {arch!r} is not supported; this importer knows "
                              f"{', '.join(ARCHITECTURES)}")
    hidden = int(_scalar(meta, f"{arch}.embedding_length"))
    heads = int(_scalar(meta, f"{arch}.attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(_scalar(meta, f"{arch}.vocab_size", len(tokens) if tokens else None))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(meta, f"{arch}.block_count")),
        "intermediate_size": int(_scalar(meta, f"{arch}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(meta, f"{arch}.attention.head_count_kv", heads)),
        "rms_norm_eps": float(_scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(meta, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(meta, f"{arch}.context_length", 4096)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "eos_token_id": int(eos.item()) if eos is not None else None,
        "bos_token_id": int(bos.item()) if bos is not None else None,
    }


def mlx_name(gguf_name: str) -> str:
    """`blk.3.attn_q.scales` -> `model.layers.3.self_attn.q_proj.scales`."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise GGUFImportError(f"tensor {gguf_name!r} has no place in an mlx-lm llama/qwen2 model")


def unpermute_rope(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (its convert script's `permute`) on rows of `w`."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_weights(raw: dict[str, mx.array], config: dict, dtype: str) -> tuple[dict, dict | None]:
    """mlx-lm weights from MLX's GGUF tensors, and the config's `quantization` block (or None)."""
    out, quant = {}, {}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for name, value in raw.items():
        base, _, kind = name.rpartition(".")
        role = base.split(".")[-1] if base.startswith("blk.") else None
        if config["model_type"] == "llama" and role in heads:
            value = unpermute_rope(value, heads[role])
        out[mlx_name(name)] = value
        if kind == "scales":
            weight = raw[f"{base}.weight"]
            bits = weight.shape[-1] // value.shape[-1]  # 32-bit words per row / groups of 32
            quant[mlx_name(f"{base}.weight").rpartition(".")[0]] = {"group_size": 32, "bits": bits}
    if not quant or dtype == "keep":
        target = mx.float16 if dtype == "float16" else None
        if target is not None:
            out = {k: v.astype(target) if v.dtype == mx.float32 else v for k, v in out.items()}
        return out, _quantization_block(quant)
    return _dequantized(out, quant, mx.float32 if dtype == "float32" else mx.float16), None


def _quantization_block(quant: dict) -> dict | None:
    """mlx-lm's config `quantization`: the commonest setting, plus overrides for other layers."""
    if not quant:
        return None
    settings = [json.dumps(q, sort_keys=True) for q in quant.values()]
    common = json.loads(max(set(settings), key=settings.count))
    return {**common, **{path: q for path, q in quant.items() if q != common}}


def _dequantized(weights: dict, quant: dict, dtype) -> dict:
    out = {}
    for name, value in weights.items():
        base, _, kind = name.rpartition(".")
        if kind in ("scales", "biases") and base in quant:
            continue
        if kind == "weight" and base in quant:
            q = quant[base]
            # In float32: float16 arithmetic on scale·q + bias cancels away the small values.
            scales, biases = (weights[f"{base}.{p}"].astype(mx.float32) for p in ("scales", "biases"))
            value = mx.dequantize(value, scales, biases, group_size=q["group_size"], bits=q["bits"])
        out[name] = value.astype(dtype)
    return out


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = {"default": _GPT2_SPLIT, "gpt2": _GPT2_SPLIT, "smollm": _GPT2_SPLIT,
             "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise GGUFImportError(f"pre-tokenizer {pre!r} is not supported; this importer knows "
                              "default, gpt2, smollm and qwen2")
    steps = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
    steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
    return pre_tokenizers.Sequence(steps)


def build_tokenizer(meta: dict):
    """A `tokenizers` byte-level BPE from the GGUF's vocabulary, merges and token types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = _scalar(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(f"tokenizer model {kind!r} is not supported; this importer knows "
                              "byte-level BPE ('gpt2'), as llama 3, qwen2 and SmolLM use")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = np.array(meta["tokenizer.ggml.token_type"]) if "tokenizer.ggml.token_type" in meta \
        else np.ones(len(tokens), np.int32)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i in np.flatnonzero(types == _USER_DEFINED)])
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in np.flatnonzero(types == _CONTROL)])
    if _flag(meta, "tokenizer.ggml.add_bos_token") and "tokenizer.ggml.bos_token_id" in meta:
        bos_id = int(_scalar(meta, "tokenizer.ggml.bos_token_id"))
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _flag(meta: dict, key: str) -> bool:
    value = meta.get(key)
    return bool(value.item()) if isinstance(value, mx.array) else bool(value)


def tokenizer_config(meta: dict, context_length: int) -> dict:
    """tokenizer_config.json: the chat template and the special tokens by name."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(value.item())] if value is not None else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": _flag(meta, "tokenizer.ggml.add_bos_token"),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = str(meta["tokenizer.chat_template"])
    return config


def check_tensor_types(tensors: list[GGUFTensor]) -> None:
    bad = [t for t in tensors if t.type_name not in TENSOR_TYPES.values()]
    if bad:
        kinds = sorted({t.type_name for t in bad})
        raise GGUFImportError(
            f"tensor {bad[0].name!r} is stored as {bad[0].type_name} ({len(bad)} tensors of type "
            f"{', '.join(kinds)}); this importer reads {', '.join(TENSOR_TYPES.values())}: "
            "pick a Q8_0, Q4_0 or Q4_1 file, or requantize with llama.cpp's llama-quantize")


def import_gguf(path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the mlx-lm model directory of a GGUF file; returns it.

    dtype: "float32" or "float16" dequantizes quantized tensors; "keep" leaves them quantized
    (MLX 4/8-bit affine, group 32). Raises GGUFImportError naming the architecture, tensor type
    or tokenizer it cannot handle, and FileExistsError for a non-empty `out_dir`. The directory
    appears complete or not at all (it is written under a temporary name, then renamed).
    """
    from mlx_lm.utils import save_config

    path, out = Path(path), Path(out_dir)
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    tensors = read_tensor_infos(path)
    check_tensor_types(tensors)
    raw, meta = mx.load(str(path), return_metadata=True)
    config = model_config(meta, {t.name for t in tensors})
    if config["model_type"] == "llama" and "blk.0.attn_q.bias" in raw:
        config["attention_bias"] = True
    tokenizer = build_tokenizer(meta)
    weights, quantization = convert_weights(raw, config, dtype)
    if quantization:
        config["quantization"] = quantization
    config["torch_dtype"] = "float16" if dtype == "float16" else "float32"

    tmp = out.with_name(f".{out.name}.importing")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(config, tmp / "config.json")
    tokenizer.save(str(tmp / "tokenizer.json"))
    atomic_write_json(tmp / "tokenizer_config.json",
                      tokenizer_config(meta, config["max_position_embeddings"]))
    atomic_write_json(tmp / "conch_import.json", {"source": path.name, "dtype": dtype,
                                                  "tensor_types": _type_counts(tensors)})
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _type_counts(tensors: list[GGUFTensor]) -> dict[str, int]:
    return dict(Counter(t.type_name for t in tensors))

"""GGUF files (Ollama, LM Studio, llama.cpp) become mlx-lm model directories.

    conch models import qwen2.5-7b-instruct-q4_k_m.gguf -o ~/models/qwen2.5-7b --dtype q4

The directory holds config.json, model*.safetensors, tokenizer.json and tokenizer_config.json (with
the chat template and special tokens from the file's metadata), so plain `mlx_lm.load(DIR)` loads it
exactly as it loads an `mlx-community/...` model.

Every storage type the `gguf` package (llama.cpp's own) can dequantize is read: F32, F16, BF16,
Q4_0 ... Q8_0, the K-quants Q2_K ... Q6_K, the I-quants, TQ1_0/TQ2_0, MXFP4 and NVFP4. The output
is `float32`, `float16`, `bfloat16`, or `q8`/`q4` (MLX affine quantization, group 64, mlx-lm's
`quantization` block). Tensors are converted a block of rows at a time and streamed into the
safetensors files, so an import holds a few blocks, never the model, in memory.

Tensor names go from llama.cpp's to mlx-lm's through gguf-py's own name map (the Hugging Face names
llama.cpp's converter reads), matched against the parameters of the mlx-lm model the config makes;
what llama.cpp's converter changed is undone: llama's Q/K rows permuted for its interleaved RoPE,
Gemma's norms stored as 1 + w, Llama 3's RoPE scaling turned into a `rope_freqs` tensor. The
tokenizer is rebuilt from the file by transformers' GGUF tokenizer builders (byte-level BPE and
SentencePiece), with llama.cpp's pre-tokenizer splits.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from conch_dna.models.gguf.reader import GGUFError, GGUFFile, TensorInfo
from conch_dna.system.fsutil import atomic_write_json

import numpy as np

OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "q8", "q4")
GROUP_SIZE = 32  # MLX affine groups: the blocks of Q4_0/Q4_1/Q8_0 and the K-quants sub-blocks, so those map onto them
BLOCK_VALUES = 1 << 22  # values converted at a time: 16 MiB of float32
SHARD_BYTES = 4 << 30  # safetensors files of at most this much, as mlx-lm writes them


DISK_MARGIN = 256 * 2**20  # free space an import leaves on the disk, beyond what it writes


class GGUFImportError(ValueError):
    """A GGUF file this importer cannot turn into an mlx-lm model; the message names what."""


@dataclass(frozen=True)
class Architecture:
    """How a GGUF architecture becomes an mlx-lm one."""

    model_type: str  # mlx-lm's
    hf_class: str
    permute_qk: bool = False  # llama.cpp permuted Q/K rows for its interleaved RoPE
    norm_offset: float = 0.0  # norms stored as offset + w (Gemma's RMSNorm scales by 1 + w)


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", permute_qk=True),  # Llama 2/3.x, Mistral, SmolLM
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM"),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM"),
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM", norm_offset=1.0),
    "phi3": Architecture("phi3", "Phi3ForCausalLM"),
}
# llama.cpp pre-tokenizers whose split transformers' builders do not set, as llama.cpp applies them
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_OWN_SPLITS = {"default": (_GPT2_SPLIT, False), "gpt2": (_GPT2_SPLIT, False), "smollm": (_GPT2_SPLIT, True)}
_CONTROL = 3  # GGUF token type of a special token


def dequantizable_types() -> set[str]:
    """The storage types the installed `gguf` package can dequantize."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    ok = set()
    for t in GGMLQuantizationType:
        block, nbytes = GGML_QUANT_SIZES[t]
        try:
            quants.dequantize(np.zeros((1, nbytes), np.uint8), t)
        except (NotImplementedError, ValueError, TypeError):
            continue
        ok.add(t.name)
    return ok


# -- the config -----------------------------------------------------------------------------------------


def _meta(meta: dict, key: str, default=None, required: bool = True):
    value = meta.get(key, default)
    if value is None and required:
        raise GGUFImportError(f"the GGUF metadata has no {key!r}")
    return value


def architecture(meta: dict) -> tuple[str, Architecture]:
    name = meta.get("general.architecture")
    if name not in ARCHITECTURES:
        raise GGUFImportError(f"architecture {name!r} is not supported; this importer knows "
                              f"{', '.join(ARCHITECTURES)} (Mistral files are 'llama')")
    return name, ARCHITECTURES[name]


def model_config(meta: dict, tensors: dict[str, TensorInfo], rope_freqs: np.ndarray | None = None) -> dict:
    """config.json for mlx-lm from the GGUF metadata (and, for Llama 3, its rope_freqs tensor)."""
    name, arch = architecture(meta)

    def get(key, default=None, required=True):
        return _meta(meta, f"{name}.{key}", default, required)

    def count(key, default=None, required=True):
        return _count(get(key, default, required), f"{name}.{key}")

    hidden, heads = count("embedding_length"), count("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens")
    config = {
        "model_type": arch.model_type, "architectures": [arch.hf_class],
        "hidden_size": hidden, "num_hidden_layers": count("block_count"),
        "intermediate_size": count("feed_forward_length"),
        "num_attention_heads": heads, "num_key_value_heads": count("attention.head_count_kv", heads),
        "rms_norm_eps": _number(get("attention.layer_norm_rms_epsilon"), f"{name}.attention.layer_norm_rms_epsilon"),
        "rope_theta": _number(get("rope.freq_base", 10000.0), f"{name}.rope.freq_base"),
        "max_position_embeddings": count("context_length", 4096),
        "vocab_size": count("vocab_size", len(tokens) if tokens is not None else None),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    head_dim = get("attention.key_length", None, required=False)
    head_dim = _count(head_dim, f"{name}.attention.key_length") if head_dim is not None else None
    _check_shape_of_model(config, head_dim, tensors, tokens, meta)
    if head_dim is not None and head_dim != hidden // heads or arch.model_type in ("qwen3", "gemma3_text"):
        config["head_dim"] = head_dim if head_dim is not None else hidden // heads
    for key, token in (("eos_token_id", "eos"), ("bos_token_id", "bos")):
        value = meta.get(f"tokenizer.ggml.{token}_token_id")
        config[key] = int(value) if value is not None else None
    if name == "llama" and "blk.0.attn_q.bias" in tensors:
        config["attention_bias"] = True
    scaling = _rope_scaling(name, meta, rope_freqs, config)
    if scaling:
        config["rope_scaling"] = scaling
    if arch.model_type == "gemma3_text":
        config["sliding_window"] = int(get("attention.sliding_window", 512))
        config["sliding_window_pattern"] = 6  # as llama.cpp runs every Gemma 3
        # llama.cpp scales 27B's queries by its width per head, the others by head_dim
        config["query_pre_attn_scalar"] = hidden // heads if config["num_hidden_layers"] == 62 else config["head_dim"]
    if arch.model_type == "phi3":
        config["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length",
                                                             config["max_position_embeddings"], required=False))
    return config


def _count(value, key: str) -> int:
    """A metadata count: a whole number of at least 1 (not a float, a string, a bool or an array)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise GGUFImportError(f"the GGUF metadata's {key} is {value!r}: it must be a whole number of at least 1")
    return int(value)


def _number(value, key: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value):
        raise GGUFImportError(f"the GGUF metadata's {key} is {value!r}: it must be a finite number")
    return float(value)


def _check_shape_of_model(config: dict, head_dim: int | None, tensors: dict[str, TensorInfo], tokens,
                          meta: dict) -> None:
    """What the metadata says of the model's shape, against itself and the tensors, before anything is built
    from it (a file claiming ten million blocks must not make the importer try)."""
    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    if head_dim is None and hidden % heads:
        raise GGUFImportError(f"the GGUF metadata has {heads} attention heads, which do not divide the width {hidden}")
    if heads % kv:
        raise GGUFImportError(f"the GGUF metadata has {kv} key-value heads, which do not divide its {heads} heads")
    blocks = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if config["num_hidden_layers"] > len(blocks):
        raise GGUFImportError(f"the GGUF metadata claims {config['num_hidden_layers']} blocks; the file has tensors "
                              f"for {len(blocks)}")
    if tokens is not None:
        for key in ("bos", "eos", "padding", "unknown"):
            value = meta.get(f"tokenizer.ggml.{key}_token_id")
            if value is not None and not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                                          and 0 <= value < len(tokens)):
                raise GGUFImportError(f"the GGUF metadata's tokenizer.ggml.{key}_token_id is {value!r}, not an id "
                                      f"of its {len(tokens)} tokens")
        if config["vocab_size"] < len(tokens):
            raise GGUFImportError(f"the GGUF metadata's vocab_size {config['vocab_size']} is smaller than its "
                                  f"{len(tokens)} tokens")


def _rope_scaling(name: str, meta: dict, rope_freqs: np.ndarray | None, config: dict) -> dict | None:
    kind = meta.get(f"{name}.rope.scaling.type")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(_meta(meta, f"{name}.rope.scaling.factor"))}
    if kind not in (None, "none") and rope_freqs is None:
        raise GGUFImportError(f"RoPE scaling {kind!r} is not supported; this importer knows linear and Llama 3's")
    if rope_freqs is None:
        return None
    original = int(meta.get(f"{name}.rope.scaling.original_context_length", 8192))
    dims = int(meta.get(f"{name}.rope.dimension_count", config["hidden_size"] // config["num_attention_heads"]))
    return llama3_scaling(rope_freqs, config["rope_theta"], dims, original)


def llama3_scaling(factors: np.ndarray, base: float, dims: int, original: int) -> dict:
    """mlx-lm's `rope_scaling` for Llama 3 from llama.cpp's rope_freqs (each frequency's divisor).

    Those divisors are 1 for short wavelengths, `factor` for long ones and a smooth blend between,
    set by low_freq_factor and high_freq_factor against the original context; the blend is linear in
    1/wavelength, so two of its points give both. Refused if mlx-lm's formula cannot give them back.
    """
    factors = np.asarray(factors, np.float64)
    wavelens = 2 * math.pi * base ** (np.arange(0, dims, 2) / dims)
    if factors.shape != wavelens.shape:
        raise GGUFImportError(f"rope_freqs has {factors.size} values, the RoPE has {wavelens.size} frequencies")
    factor = float(factors.max())
    medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 or medium.sum() < 2:
        raise GGUFImportError("rope_freqs that are not Llama 3's RoPE scaling (too few blended frequencies)")
    smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
    # smooth · (high - low) = original / wavelen - low, i.e. smooth · high + (1 - smooth) · low = original / wavelen
    a = np.stack([smooth, 1 - smooth], axis=1)
    (high, low), *_ = np.linalg.lstsq(a, original / wavelens[medium], rcond=None)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
               "high_freq_factor": float(high), "original_max_position_embeddings": original}
    if not np.allclose(_llama3_factors(wavelens, scaling), factors, rtol=1e-3):
        raise GGUFImportError("rope_freqs that Llama 3's RoPE scaling cannot give back")
    return scaling


def _llama3_factors(wavelens: np.ndarray, s: dict) -> np.ndarray:
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    smooth = (s["original_max_position_embeddings"] / wavelens - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    blended = 1 / ((1 - smooth) / s["factor"] + smooth)
    return np.where(wavelens < high_wavelen, 1.0, np.where(wavelens > low_wavelen, s["factor"], blended))


# -- names and what each tensor becomes ---------------------------------------------------------------------


def mlx_parameters(config: dict) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(parameter name -> shape, the modules mlx-lm can quantize) of the model config.json makes;
    nothing is allocated (MLX arrays are lazy)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    quantizable = {path for path, module in model.named_modules()
                   if isinstance(module, (nn.Linear, nn.Embedding)) and hasattr(module, "to_quantized")}
    return shapes, quantizable


def name_map(arch_name: str, blocks: int, parameters: dict) -> dict[str, str]:
    """GGUF tensor name -> mlx-lm parameter name, from gguf-py's map of Hugging Face names."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = {v: k for k, v in MODEL_ARCH_NAMES.items()}[arch_name]
    out = {}
    for hf, (_, gguf_name) in get_tensor_name_map(arch, blocks).mapping.items():
        for suffix in ("weight", "bias"):
            if f"{hf}.{suffix}" in parameters:
                out[f"{gguf_name}.{suffix}"] = f"{hf}.{suffix}"
    return out


@dataclass(frozen=True)
class Plan:
    """One GGUF tensor's way into the output: its mlx-lm name, rows to un-permute (heads), a norm offset
    to take away, and whether it is quantized."""

    source: TensorInfo
    name: str
    heads: int = 0
    offset: float = 0.0
    quantize: bool = False


def plan_tensors(f: GGUFFile, config: dict, dtype: str) -> list[Plan]:
    arch_name, arch = architecture(f.metadata)
    parameters, quantizable = mlx_parameters(config)
    names = name_map(arch_name, config["num_hidden_layers"], parameters)
    plans, placed = [], set()
    for t in f.tensors:
        if t.name == "rope_freqs.weight":
            continue  # in the config: rope_scaling
        if t.name not in names:
            raise GGUFImportError(f"tensor {t.name!r} has no place in mlx-lm's {arch.model_type} model")
        name = names[t.name]
        if tuple(t.numpy_shape) != parameters[name]:
            raise GGUFImportError(f"tensor {t.name!r} has shape {t.numpy_shape}; mlx-lm's {name} is "
                                  f"{parameters[name]}: the metadata does not describe these tensors")
        role = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        heads = 0
        if arch.permute_qk and role in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if role == "attn_q" else "num_key_value_heads"]
        module = name.rpartition(".")[0]
        quantize = (dtype in ("q4", "q8") and name.endswith(".weight") and module in quantizable
                    and t.numpy_shape[-1] % GROUP_SIZE == 0)
        plans.append(Plan(t, name, heads, arch.norm_offset if "norm" in role or t.name == "output_norm.weight"
                          else 0.0, quantize))
        placed.add(name)
    missing = sorted(set(parameters) - placed - ({"lm_head.weight"} if config["tie_word_embeddings"] else set()))
    if missing:
        raise GGUFImportError(f"the file has no tensor for mlx-lm's {missing[0]} ({len(missing)} missing)")
    return plans


# -- converting and writing, a block of rows at a time ---------------------------------------------------------


_SAFETENSORS_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}


@dataclass(frozen=True)
class Output:
    """What an import writes: `weights` (an OUTPUT_DTYPES name) and, for q4/q8, `rest`: the float type of
    the scales, biases and unquantized tensors (float16; float32 where MLX runs half precision slowly)."""

    weights: str
    rest: str

    @property
    def bits(self) -> int | None:
        return {"q4": 4, "q8": 8}.get(self.weights)

    @property
    def floats(self) -> str:
        return self.rest if self.bits else self.weights


def default_rest_dtype() -> str:
    """float16 where MLX has a GPU; float32 on a CPU, where its half-precision quantized matmul is ~40x
    slower than float32's (bench/gguf_import.py)."""
    import mlx.core as mx

    gpu = mx.metal.is_available() or (getattr(mx, "cuda", None) is not None and mx.cuda.is_available())
    return "float16" if gpu else "float32"


def _outputs(plan: Plan, out: Output) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, safetensors dtype, shape, bytes) of what a tensor becomes."""
    shape = plan.source.numpy_shape
    code, size = _SAFETENSORS_DTYPES[out.floats]
    if plan.quantize:
        bits = out.bits
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        base = plan.name.rpartition(".")[0]
        packed = (*shape[:-1], cols * bits // 32)
        groups = (*shape[:-1], cols // GROUP_SIZE)
        return [(plan.name, "U32", packed, rows * cols * bits // 8),
                (f"{base}.scales", code, groups, rows * cols // GROUP_SIZE * size),
                (f"{base}.biases", code, groups, rows * cols // GROUP_SIZE * size)]
    return [(plan.name, code, shape, plan.source.values * size)]


def _row_blocks(plan: Plan) -> list[tuple[int, int]]:
    t = plan.source
    per = max(1, BLOCK_VALUES // t.shape[0])
    if plan.heads:  # un-permuting moves rows within a head: blocks of whole heads
        head_rows = t.rows // plan.heads
        per = max(head_rows, per // head_rows * head_rows)
    return [(r, min(r + per, t.rows)) for r in range(0, t.rows, per)]


def _converted(f: GGUFFile, plan: Plan, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor as float32 [rows, row length], with llama.cpp's changes undone."""
    from gguf import quants

    t = plan.source
    values = quants.dequantize(f.raw_rows(t, start, stop), t.type_id).reshape(stop - start, t.shape[0])
    values = values.astype(np.float32, copy=False)
    if plan.heads:
        n = (stop - start) // (t.rows // plan.heads)
        values = values.reshape(n, -1, 2, t.shape[0]).swapaxes(1, 2).reshape(values.shape)
    if plan.offset:
        values = values - np.float32(plan.offset)
    return values


def _block_bytes(values: np.ndarray, plan: Plan, out: Output) -> list[bytes]:
    """A converted block as the bytes of each output of the tensor, in _outputs' order."""
    if plan.quantize:
        import mlx.core as mx

        q, scales, biases = mx.quantize(mx.array(values, getattr(mx, out.rest)), group_size=GROUP_SIZE,
                                        bits=out.bits)
        return [np.array(q).tobytes(), np.array(scales).tobytes(), np.array(biases).tobytes()]
    target = out.floats
    if target == "bfloat16":
        return [_to_bfloat16(values).tobytes()]
    return [values.astype(target, copy=False).tobytes()]


def _to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even (as MLX and torch round)."""
    bits = values.astype(np.float32, copy=False).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (rounded >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), out)


def _shards(plans: list[Plan], out: Output) -> list[list[Plan]]:
    shards, current, size = [], [], 0
    for plan in plans:
        nbytes = sum(o[3] for o in _outputs(plan, out))
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(plan)
        size += nbytes
    return shards + [current] if current else shards


def _write_shard(f: GGUFFile, plans: list[Plan], fmt: Output, path: Path) -> dict[str, str]:
    """A safetensors file streamed block by block: its header first (every size is known from the GGUF's)."""
    header, offset, order = {}, 0, []
    for plan in plans:
        outs = _outputs(plan, fmt)
        for name, code, shape, nbytes in outs:
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        order.append((plan, outs))
    header["__metadata__"] = {"format": "mlx"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for plan, outs in order:
            # each output is written whole, in its place: a quantized weight's scales follow all its rows
            parts = [bytearray() for _ in outs] if len(outs) > 1 else None
            for start, stop in _row_blocks(plan):
                pieces = _block_bytes(_converted(f, plan, start, stop), plan, fmt)
                if parts is None:
                    out.write(pieces[0])
                else:
                    for part, piece in zip(parts[1:], pieces[1:]):
                        part += piece
                    out.write(pieces[0])
            if parts is not None:
                for part in parts[1:]:
                    out.write(part)
    return {name: path.name for name in header if name != "__metadata__"}


# -- the tokenizer ------------------------------------------------------------------------------------------


def build_tokenizer(meta: dict):
    """A `tokenizers` Tokenizer from the GGUF's vocabulary (transformers' GGUF builders), split as
    llama.cpp splits it, with BOS added where the file says so."""
    from tokenizers import Regex, pre_tokenizers, processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_PRE_TOKENIZER_SPLITS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    kind, pre = meta.get("tokenizer.ggml.model"), str(meta.get("tokenizer.ggml.pre", "default"))
    if kind not in ("gpt2", "llama"):
        raise GGUFImportError(f"tokenizer model {kind!r} is not supported; this importer knows byte-level BPE "
                              "('gpt2': Llama 3, Qwen, SmolLM, Phi 4) and SentencePiece ('llama': Llama 2, "
                              "Mistral, Gemma, Phi 3)")
    if kind == "gpt2" and pre not in GGUF_PRE_TOKENIZER_SPLITS and pre not in _OWN_SPLITS:
        raise GGUFImportError(f"pre-tokenizer {pre!r} is not supported; this importer knows "
                              f"{', '.join(sorted([*GGUF_PRE_TOKENIZER_SPLITS, *_OWN_SPLITS]))}")
    plain = {name: _plain(meta[f"tokenizer.{key}"]) for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
             if f"tokenizer.{key}" in meta}
    try:
        tokenizer, _ = convert_gguf_tokenizer(meta["general.architecture"], plain)
    except Exception as exc:  # noqa: BLE001 - whatever the builder objects to, said with the file's words
        raise GGUFImportError(f"cannot rebuild the {kind!r} tokenizer: {exc}") from None
    if kind == "gpt2" and pre in _OWN_SPLITS:
        split, digits = _OWN_SPLITS[pre]
        steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [*steps, pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if _add_bos(meta) and bos is not None:
        token = plain["tokens"][int(bos)]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{token}:0 $A:0", pair=f"{token}:0 $A:0 {token}:1 $B:1", special_tokens=[(token, int(bos))])
    elif kind == "gpt2":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def _add_bos(meta: dict) -> bool:
    flag = meta.get("tokenizer.ggml.add_bos_token")
    return bool(flag) if flag is not None else meta.get("tokenizer.ggml.model") == "llama"


def tokenizer_config(meta: dict, context_length: int) -> dict:
    """tokenizer_config.json: the chat template and the special tokens by name."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(value)] if value is not None and 0 <= int(value) < len(tokens) else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
              "bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
              "unk_token": token("unknown"), "add_bos_token": _add_bos(meta), "clean_up_tokenization_spaces": False}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = str(meta["tokenizer.chat_template"])
    return config


# -- the import -----------------------------------------------------------------------------------------------


def check_tensor_types(tensors: list[TensorInfo]) -> None:
    readable = dequantizable_types()
    bad = [t for t in tensors if t.type_name not in readable]
    if bad:
        kinds = sorted({t.type_name for t in bad})
        raise GGUFImportError(f"tensor {bad[0].name!r} is stored as {bad[0].type_name} ({len(bad)} tensors of type "
                              f"{', '.join(kinds)}), which the installed gguf package cannot dequantize")


def describe(path: str | Path) -> dict:
    """What a GGUF file holds, from its header alone: architecture, parameters, storage types, and
    whether this importer takes it (with the reason when not)."""
    try:
        with GGUFFile.open(path) as f:
            meta, tensors = f.metadata, f.tensors
            types = Counter(t.type_name for t in tensors)
            info = {"architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
                    "parameters": sum(t.values for t in tensors), "quantization": types.most_common(1)[0][0]
                    if types else None, "tensor_types": dict(types)}
            try:
                architecture(meta)
                check_tensor_types(tensors)
                if meta.get("tokenizer.ggml.model") not in ("gpt2", "llama"):
                    raise GGUFImportError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported")
                info.update(importable=True, reason=None)
            except GGUFImportError as exc:
                info.update(importable=False, reason=str(exc))
            return info
    except GGUFError as exc:
        return {"architecture": None, "importable": False, "reason": str(exc)}


def import_gguf(path: str | Path, out_dir: str | Path, dtype: str = "float32", rest_dtype: str | None = None) -> Path:
    """Write the mlx-lm model directory of a GGUF file; returns it.

    `dtype`: float32, float16 or bfloat16 (dequantized), q8 or q4 (MLX affine, group 32); with q8/q4,
    `rest_dtype` (float16 or float32, default: default_rest_dtype()) is that of the scales, biases and
    unquantized tensors. Raises
    GGUFImportError naming the architecture, tensor type or tokenizer it cannot handle (GGUFError,
    its parent, for a file that is not a sound GGUF), FileExistsError for a non-empty `out_dir`.
    The directory appears complete or not at all (written under a temporary name, then renamed).
    """
    from mlx_lm.utils import save_config

    path, out = Path(path), Path(out_dir)
    if dtype not in OUTPUT_DTYPES:
        raise GGUFImportError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    rest = rest_dtype or default_rest_dtype()
    if rest not in ("float16", "float32"):
        raise GGUFImportError(f"rest_dtype must be float16 or float32, got {rest!r}")
    fmt = Output(dtype, rest)
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    try:
        f = GGUFFile.open(path)
    except GGUFError as exc:
        raise GGUFImportError(str(exc)) from None
    tmp = out.with_name(f".{out.name}.importing")
    try:
        check_tensor_types(f.tensors)
        meta, by_name = f.metadata, {t.name: t for t in f.tensors}
        rope = None
        if "rope_freqs.weight" in by_name:
            rope = _converted(f, Plan(by_name["rope_freqs.weight"], "rope_freqs"), 0, 1)[0]
        config = model_config(meta, by_name, rope)
        tokenizer = build_tokenizer(meta)
        plans = plan_tensors(f, config, dtype)
        if dtype in ("q4", "q8"):
            bits = 4 if dtype == "q4" else 8
            config["quantization"] = config["quantization_config"] = {"group_size": GROUP_SIZE, "bits": bits}
        config["torch_dtype"] = fmt.floats
        planned = sum(size for plan in plans for *_, size in _outputs(plan, fmt))
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        if planned + DISK_MARGIN > free:
            raise GGUFImportError(f"the import needs {planned / 2**20:.0f} MiB and {out.parent} has {free / 2**20:.0f}"
                                  f" MiB free (keeping {DISK_MARGIN // 2**20} MiB spare): free some space or "
                                  "choose a smaller --dtype")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        shards = _shards(plans, fmt)
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            weight_map.update(_write_shard(f, shard, fmt, tmp / name))
        if len(shards) > 1:
            atomic_write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        save_config(config, tmp / "config.json")
        tokenizer.save(str(tmp / "tokenizer.json"))
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config(meta, config["max_position_embeddings"]))
        atomic_write_json(tmp / "conch_import.json", {"source": path.name, "dtype": dtype,
                                                      "tensor_types": dict(Counter(t.type_name for t in f.tensors))})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        f.close()
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out

"""config.json for mlx-lm from a GGUF's metadata: the architecture, the model's shape (whole positive counts,
heads that divide the width, no more blocks than the file has tensors for, token ids inside the vocabulary),
checked before anything is built from it, and RoPE scaling (Llama 3's rope_freqs given back as its settings)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from conch_dna.models.gguf.reader import TensorInfo

import numpy as np


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


# -- the config--------------------------------------------------------------------------------------


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

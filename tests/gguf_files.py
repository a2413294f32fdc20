"""GGUF files of tiny models of each architecture, written with llama.cpp's own Python writer (gguf-py)
as llama.cpp's converter lays them out: tensor names from gguf-py's map, llama's Q/K rows permuted
for its interleaved RoPE, Gemma's norms stored as 1 + w, Llama 3's RoPE scaling as rope_freqs. Matrices
are stored in any ggml type as raw blocks of that type; the references are gguf-py's dequantization
of the same bytes, with those changes undone here, independently of the importer."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conch_dna.kit import TEACHER_PATH

import gguf
import numpy as np

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, BLOCKS = 256, 4, 2, 64, 512, 2
# the kit's tokenizer (byte-level BPE, 512 tokens): the tiny models' vocabulary
_KIT_TOKENIZER = json.loads((Path(TEACHER_PATH) / "tokenizer.json").read_text())
VOCAB = len(_KIT_TOKENIZER["model"]["vocab"])
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def hf_config(arch: str, llama3: bool = False) -> dict:
    """The Hugging Face / mlx-lm config.json of a tiny model of `arch`."""
    base = {"hidden_size": HIDDEN, "num_hidden_layers": BLOCKS, "intermediate_size": FFN,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5,
            "vocab_size": VOCAB, "max_position_embeddings": 4096, "rope_theta": 10000.0,
            "tie_word_embeddings": arch in ("gemma3", "qwen3")}
    if arch == "llama":
        return {**base, "model_type": "llama", **({"rope_scaling": dict(LLAMA3_SCALING), "rope_theta": 500000.0,
                                                    "max_position_embeddings": 131072}
                                                   if llama3 else {})}
    if arch == "qwen2":
        return {**base, "model_type": "qwen2"}
    if arch == "qwen3":
        return {**base, "model_type": "qwen3", "head_dim": HEAD_DIM}
    if arch == "gemma3":
        # six blocks: mlx-lm's Gemma 3 runs a global-attention block every sliding_window_pattern
        return {**base, "model_type": "gemma3_text", "head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM,
                "num_hidden_layers": 6,
                "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
    if arch == "phi3":
        return {**base, "model_type": "phi3", "original_max_position_embeddings": 4096}
    raise ValueError(arch)


def hf_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights of the mlx-lm model `config` makes, by name (norms near 1, small matrices)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    shapes = {k: v.shape for k, v in tree_flatten(model_class(args_class.from_dict(config)).parameters())
              if not (k == "lm_head.weight" and config["tie_word_embeddings"])}
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if "norm" in name:
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    if config["model_type"] == "gemma3_text":  # Gemma's norms scale by 1 + w: w near 0
        out = {k: (v - 1.0 if "norm" in k else v) for k, v in out.items()}
    return out


def gguf_arch(config: dict) -> str:
    return {"gemma3_text": "gemma3"}.get(config["model_type"], config["model_type"])


def gguf_names(config: dict) -> dict[str, str]:
    """mlx-lm (Hugging Face) tensor name -> llama.cpp's, from gguf-py's own map."""
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch(config)]
    tmap = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    out = {}
    for name in hf_weights(config):
        base, _, suffix = name.rpartition(".")
        out[name] = f"{tmap.get_name(base)}.{suffix}"
    return out


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's `permute` of Q/K rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(config: dict) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3's RoPE scaling (its convert script's loop)."""
    s, dims = config["rope_scaling"], config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (config["rope_theta"] ** (np.arange(0, dims, 2) / dims))
    low = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high = s["original_max_position_embeddings"] / s["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(factors, np.float32)


def raw_blocks(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, rng) -> np.ndarray:
    """Random bytes laid out as blocks of `qtype` for a tensor of `shape` (numpy order). Every byte is
    in [0x20, 0x3B], so any half, bfloat16 or float a block holds reads as a finite, moderate number."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    return rng.integers(0x20, 0x3C, size=(rows, cols // block * nbytes), dtype=np.uint8)


def write_gguf(path: Path, config: dict, weights: dict[str, np.ndarray], qtype: str = "F32",
               pre: str = "default", seed: int = 0) -> Path:
    """A GGUF of the model: matrices stored as `qtype` (F32/F16/BF16 from the values, any other type as
    random raw blocks), vectors as F32; the metadata as llama.cpp's converter writes it."""
    arch = gguf_arch(config)
    q = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_vocab_size(config["vocab_size"])
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    if arch == "gemma3":
        w.add_sliding_window(config["sliding_window"])
    _add_kit_tokenizer(w, pre)
    names = gguf_names(config)
    for name, value in weights.items():
        gname = names[name]
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            heads = config["num_attention_heads" if ".attn_q." in gname else "num_key_value_heads"]
            value = llama_cpp_permute(value, heads)
        if arch == "gemma3" and "norm" in gname:
            value = value + 1.0
        if value.ndim == 1:
            w.add_tensor(gname, value.astype(np.float32))
        elif qtype == "F32":
            w.add_tensor(gname, value.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(gname, value.astype(np.float16))
        elif qtype == "BF16":
            w.add_tensor(gname, gguf.quants.quantize(value, q), raw_dtype=q)
        else:
            w.add_tensor(gname, raw_blocks(value.shape, q, rng), raw_dtype=q)
    if config.get("rope_scaling", {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(config))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_kit_tokenizer(w, pre: str) -> None:
    vocab = _KIT_TOKENIZER["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["id"] for a in _KIT_TOKENIZER["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in _KIT_TOKENIZER["model"]["merges"]])
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def reference_weights(path: Path, config: dict) -> dict[str, np.ndarray]:
    """What the file holds, dequantized by gguf-py and with llama.cpp's changes undone, by mlx-lm name."""
    arch = gguf_arch(config)
    inverse = {v: k for k, v in gguf_names(config).items()}
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == "rope_freqs.weight":
            continue
        value = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        value = value.reshape([int(d) for d in reversed(t.shape)])
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config["num_attention_heads" if ".attn_q." in t.name else "num_key_value_heads"]
            half = value.shape[0] // heads // 2
            value = value.reshape(heads, half, 2, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)
        if arch == "gemma3" and "norm" in t.name:
            value = value - 1.0
        out[inverse[t.name]] = value
    return out

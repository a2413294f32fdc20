"""GGUF files written from the kit teacher with llama.cpp's own Python writer (gguf-py), as
llama.cpp's convert script lays them out: llama's Q/K rows permuted for interleaved RoPE."""

from __future__ import annotations

import json
from pathlib import Path

from conch_dna.kit import TEACHER_PATH

import gguf
import numpy as np
from safetensors.numpy import load_file

QTYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
          "Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_0": gguf.GGMLQuantizationType.Q4_0,
          "Q4_1": gguf.GGMLQuantizationType.Q4_1, "Q4_K": gguf.GGMLQuantizationType.Q4_K}
_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's `permute` of Q/K rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def kit_weights(arch: str, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """The kit teacher's weights in Hugging Face order (qwen2 gets random Q/K/V biases)."""
    config = json.loads((Path(TEACHER_PATH) / "config.json").read_text())
    weights = {k: v.astype(np.float32) for k, v in load_file(f"{TEACHER_PATH}/model.safetensors").items()}
    if arch == "qwen2":
        rng = np.random.default_rng(seed)
        for name in list(weights):
            if any(p in name for p in ("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                bias = rng.normal(0, 0.5, weights[name].shape[0]).astype(np.float32)
                weights[name.replace(".weight", ".bias")] = bias
    return weights, config


def write_gguf(path: Path, arch: str, qtype: str, weights: dict[str, np.ndarray], config: dict,
               pre: str = "default") -> Path:
    """A GGUF file of `weights` with matrices stored as `qtype` (norms and biases stay F32)."""
    tok = json.loads((Path(TEACHER_PATH) / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    specials = {a["id"] for a in tok["added_tokens"] if a["special"]}
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
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    for name, value in weights.items():
        gname = _gguf_name(name)
        if arch == "llama" and ("attn_q." in gname or "attn_k." in gname):
            heads = config["num_attention_heads" if "attn_q." in gname else "num_key_value_heads"]
            value = llama_cpp_permute(value, heads)
        if value.ndim == 2 and qtype == "Q4_K":  # gguf-py cannot quantize K-types: blocks of zeros
            block_values, block_bytes = gguf.GGML_QUANT_SIZES[QTYPES[qtype]]
            data = np.zeros((value.shape[0], value.shape[1] // block_values * block_bytes), np.uint8)
            w.add_tensor(gname, data, raw_dtype=QTYPES[qtype])
        elif value.ndim == 2:
            q = QTYPES[qtype]
            data = value.astype(np.float16) if qtype == "F16" else gguf.quants.quantize(value, q)
            w.add_tensor(gname, data, raw_dtype=q)
        else:
            w.add_tensor(gname, value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = name.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{index}.{_NAMES[module]}.{kind}"


def reference_weights(path: Path, arch: str, config: dict) -> dict[str, np.ndarray]:
    """What the file holds, dequantized by gguf-py and un-permuted: Hugging Face order, float32."""
    inverse = {v: k for k, v in _NAMES.items()}
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        value = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        value = value.reshape([int(d) for d in reversed(t.shape)])
        parts = t.name.split(".")
        if parts[0] == "blk":
            if arch == "llama" and parts[2] in ("attn_q", "attn_k"):
                heads = config["num_attention_heads" if parts[2] == "attn_q" else "num_key_value_heads"]
                half = value.shape[0] // heads // 2
                value = value.reshape(heads, half, 2, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)
            name = f"model.layers.{parts[1]}.{inverse[parts[2]]}.{parts[3]}"
        else:
            name = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[parts[0]]
            name = f"{name}.{parts[1]}"
        out[name] = value
    return out

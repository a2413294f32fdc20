"""A GGUF's tokenizer rebuilt by transformers' GGUF builders (byte-level BPE and SentencePiece) with
llama.cpp's pre-tokenizer splits, and tokenizer_config.json: the chat template and the special tokens."""

from __future__ import annotations

from conch_dna.models.gguf.config import GGUFImportError

import numpy as np

# llama.cpp pre-tokenizers whose split transformers' builders do not set, as llama.cpp applies them
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_OWN_SPLITS = {"default": (_GPT2_SPLIT, False), "gpt2": (_GPT2_SPLIT, False), "smollm": (_GPT2_SPLIT, True)}
_CONTROL = 3  # GGUF token type of a special token


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



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

import shutil
from collections import Counter
from pathlib import Path

from conch_dna.models.gguf.config import GGUFImportError, architecture, model_config
from conch_dna.models.gguf.reader import GGUFError, GGUFFile, TensorInfo
from conch_dna.models.gguf.tokenizer import build_tokenizer, tokenizer_config  # noqa: F401 - the importer's API
from conch_dna.models.gguf.weights import (  # noqa: F401 - the importer's API
    GROUP_SIZE,
    OUTPUT_DTYPES,
    Output,
    Plan,
    converted_rows,
    default_rest_dtype,
    dequantizable_types,
    outputs_of,
    plan_tensors,
    shards_of,
    write_shard,
)
from conch_dna.system.fsutil import atomic_write_json

DISK_MARGIN = 256 * 2**20  # free space an import leaves on the disk, beyond what it writes


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
            rope = converted_rows(f, Plan(by_name["rope_freqs.weight"], "rope_freqs"), 0, 1)[0]
        config = model_config(meta, by_name, rope)
        tokenizer = build_tokenizer(meta)
        plans = plan_tensors(f, config, dtype)
        if dtype in ("q4", "q8"):
            bits = 4 if dtype == "q4" else 8
            config["quantization"] = config["quantization_config"] = {"group_size": GROUP_SIZE, "bits": bits}
        config["torch_dtype"] = fmt.floats
        planned = sum(size for plan in plans for *_, size in outputs_of(plan, fmt))
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        if planned + DISK_MARGIN > free:
            raise GGUFImportError(f"the import needs {planned / 2**20:.0f} MiB and {out.parent} has {free / 2**20:.0f}"
                                  f" MiB free (keeping {DISK_MARGIN // 2**20} MiB spare): free some space or "
                                  "choose a smaller --dtype")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        shards = shards_of(plans, fmt)
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            weight_map.update(write_shard(f, shard, fmt, tmp / name))
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

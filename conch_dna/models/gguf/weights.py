"""A GGUF's tensors as mlx-lm's: each tensor's place in the model the config makes (gguf-py's name map), what
llama.cpp's converter changed undone, and the conversion, a block of rows at a time, streamed into
safetensors files in the output dtype (float32/16, bfloat16, or MLX affine q8/q4)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from conch_dna.models.gguf.config import GGUFImportError, architecture
from conch_dna.models.gguf.reader import GGUFFile, TensorInfo

import numpy as np

OUTPUT_DTYPES = ("float32", "float16", "bfloat16", "q8", "q4")
GROUP_SIZE = 32  # MLX affine groups: the blocks of Q4_0/Q4_1/Q8_0 and the K-quants sub-blocks, so those map onto them
BLOCK_VALUES = 1 << 22  # values converted at a time: 16 MiB of float32
SHARD_BYTES = 4 << 30  # safetensors files of at most this much, as mlx-lm writes them


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


def outputs_of(plan: Plan, out: Output) -> list[tuple[str, str, tuple[int, ...], int]]:
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


def converted_rows(f: GGUFFile, plan: Plan, start: int, stop: int) -> np.ndarray:
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
    """A converted block as the bytes of each output of the tensor, in outputs_of' order."""
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


def shards_of(plans: list[Plan], out: Output) -> list[list[Plan]]:
    shards, current, size = [], [], 0
    for plan in plans:
        nbytes = sum(o[3] for o in outputs_of(plan, out))
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(plan)
        size += nbytes
    return shards + [current] if current else shards


def write_shard(f: GGUFFile, plans: list[Plan], fmt: Output, path: Path) -> dict[str, str]:
    """A safetensors file streamed block by block: its header first (every size is known from the GGUF's)."""
    header, offset, order = {}, 0, []
    for plan in plans:
        outs = outputs_of(plan, fmt)
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
                pieces = _block_bytes(converted_rows(f, plan, start, stop), plan, fmt)
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



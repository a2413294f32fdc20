"""Peak memory and time of `conch models import` on a GGUF with Llama-7B-sized tensors, against the largest
tensor's float32 size (the goal: peak <= 1.5x that, plus the output being written; the importer streams
its output, so the output is not held).

The file holds one block of Llama 2 7B (4096 wide, 11008 in the MLP) and its 32000 x 4096 embedding and
output, stored as --type (random blocks: what a real file's bytes cost to convert is the same). Each import
runs in a fresh process; its peak resident memory, less that of the same process doing everything but the
import, is the import's.

    python bench/gguf_import.py                       # Q4_K_M-like: Q4_K, to q4, float16 and float32
    python bench/gguf_import.py --type Q6_K --to q8,bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conch_dna.kit import TEACHER_PATH

import gguf
import numpy as np

SHAPES = {"token_embd.weight": (32000, 4096), "output.weight": (32000, 4096), "output_norm.weight": (4096,),
          "blk.0.attn_norm.weight": (4096,), "blk.0.ffn_norm.weight": (4096,),
          "blk.0.attn_q.weight": (4096, 4096), "blk.0.attn_k.weight": (4096, 4096),
          "blk.0.attn_v.weight": (4096, 4096), "blk.0.attn_output.weight": (4096, 4096),
          "blk.0.ffn_gate.weight": (11008, 4096), "blk.0.ffn_up.weight": (11008, 4096),
          "blk.0.ffn_down.weight": (4096, 11008)}

CHILD = """
import json, resource, sys, time
from conch_dna.models.gguf.importer import import_gguf
import mlx.core, mlx_lm, gguf, transformers  # what the import loads, loaded in the baseline too
tic = time.perf_counter()
if sys.argv[1] != "baseline":
    import_gguf(sys.argv[2], sys.argv[3], sys.argv[1])
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "s": time.perf_counter() - tic}))
"""


def write_file(path: Path, qtype: str) -> None:
    q = gguf.GGMLQuantizationType[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[q]
    tok = json.loads((Path(TEACHER_PATH) / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 4096), (w.add_embedding_length, 4096),
                       (w.add_feed_forward_length, 11008), (w.add_head_count, 32), (w.add_head_count_kv, 32),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, 32000)):
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    rng = np.random.default_rng(0)
    for name, shape in SHAPES.items():
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, np.float32))
        else:
            w.add_tensor(name, rng.integers(0x20, 0x3C, size=(shape[0], shape[1] // block * nbytes), dtype=np.uint8),
                         raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run(mode: str, gguf_path: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(gguf_path), str(out)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--type", default="Q4_K", help="the storage type of the file's matrices")
    p.add_argument("--to", default="q4,float16,float32", help="output dtypes, comma-separated")
    args = p.parse_args()
    largest = max(int(np.prod(s)) for s in SHAPES.values()) * 4
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        write_file(path, args.type)
        base = run("baseline", path, Path(tmp) / "none")["peak_kib"] * 1024
        print(f"file: {args.type}, {path.stat().st_size / 2**20:.0f} MiB; largest tensor 32000 x 4096 = "
              f"{largest / 2**20:.0f} MiB as float32; baseline process {base / 2**20:.0f} MiB\n")
        print("| output | import peak | x largest float32 tensor | output on disk | seconds |")
        print("|---|---:|---:|---:|---:|")
        for dtype in args.to.split(","):
            out = Path(tmp) / dtype
            tic = time.perf_counter()
            got = run(dtype, path, out)
            peak = got["peak_kib"] * 1024 - base
            disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            print(f"| {dtype} | {peak / 2**20:.0f} MiB | {peak / largest:.2f} | {disk / 2**20:.0f} MiB | "
                  f"{got['s']:.1f} (process {time.perf_counter() - tic:.1f}) |")


if __name__ == "__main__":
    main()

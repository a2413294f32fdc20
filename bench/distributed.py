"""Data-parallel KD steps on loopback: step time and tokens/s with 1 and 2 ranks (mlx.launch, ring backend),
per core, and the bytes a step exchanges, from which the README estimates two Macs.

Both ranks share this machine's cores (and its memory bandwidth), so each configuration is also timed
with one BLAS thread per process, and one rank alone on half the global batch: what each of two Macs
computes per step, so the step time two Macs would see if the wire were free. The teacher targets
are made first (cached), so only training steps are timed (after 2 warm-up steps, which compile).

    python bench/distributed.py                      # the kit
    python bench/distributed.py --pair-dir /tmp/pair --batch-size 4 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pair_args import add_model_args, parse_model_args

RANK = r"""
import json, sys, time
from pathlib import Path
from conch_dna.system import distributed
from conch_dna.training.callbacks import KDCallback
from conch_dna.kit.seeds import DOMAIN_PROMPTS
from conch_dna.training.true_kd import KDConfig, TrueKnowledgeDistiller, train_kd
from mlx.utils import tree_flatten
args = json.loads(sys.argv[1])
config = KDConfig(num_iters=args["steps"] + 2, batch_size=args["batch_size"], lora_rank=8, lora_layers=1024,
                  on_policy=0.0, hidden_weight=0.0, max_answer_tokens=args["tokens"], steps_per_report=1)
distiller = TrueKnowledgeDistiller(args["teacher"], args["student"], config, output_dir=args["tmp"],
                                   cache_dir=Path(args["tmp"]) / "cache")
prompts = DOMAIN_PROMPTS[args["domain"]]["examples"][: args["prompts"]]
model, tokenizer, adapter_config = distiller.load_student()
examples = distiller.teacher_examples(args["domain"], prompts, tokenizer)
distiller.teachers.release()
times = []

class Clock(KDCallback):
    def on_train_report(self, report):
        times.append((time.perf_counter(), report["tokens_per_second"]))

train_kd(model, examples, config, adapter_config, None, Clock())
steps = [b[0] - a[0] for a, b in zip(times[1:], times[2:])]  # after two compiling steps
payload = sum(v.size * 4 for _, v in tree_flatten(model.trainable_parameters()))  # float32 gradients
if distributed.is_leader():
    print(json.dumps({"ranks": distributed.size(), "step_s": sum(steps) / len(steps),
                      "tokens_per_s": sum(t for _, t in times[2:]) / len(times[2:]), "gradient_bytes": payload}))
"""


def run(args, ranks: int, threads: int, batch_size: int, tmp: str) -> dict:
    spec = json.dumps({"teacher": args.teacher, "student": args.student, "domain": args.domains.split(",")[0],
                       "prompts": args.prompts, "steps": args.steps, "batch_size": batch_size,
                       "tokens": args.max_answer_tokens, "tmp": tmp})
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    script = Path(tmp) / "rank.py"
    script.write_text(RANK)
    cmd = [sys.executable, str(script), spec]
    if ranks > 1:  # conch's mlx.launch (daemon.launch), as the daemon's worker runs
        cmd = [sys.executable, "-m", "daemon.launch", "--backend", "ring", "-n", str(ranks), "--python",
               sys.executable, str(script), spec]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, domains="task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--max-answer-tokens", type=int, default=64)
    args = parse_model_args(p)
    cores = os.cpu_count() or 1
    half = args.batch_size // 2
    with tempfile.TemporaryDirectory() as tmp:
        # the last row is what one rank of two computes: with a free wire, two Macs step in its time
        rows = [(1, 1, args.batch_size), (1, cores, args.batch_size), (2, 1, args.batch_size), (1, 1, half)]
        results = {row: run(args, *row, tmp) for row in dict.fromkeys(rows)}
    print(f"global batch {args.batch_size}, {args.steps} timed steps, {cores} cores\n")
    print("| ranks x BLAS threads, batch | step | tokens/s | tokens/s per core used | vs 1 rank x 1 thread |")
    print("|---|---:|---:|---:|---:|")
    base = results[(1, 1, args.batch_size)]["tokens_per_s"]
    for (r, t, b), got in results.items():
        used = min(cores, r * t)
        print(f"| {r} x {t}, {b} | {got['step_s'] * 1000:.0f} ms | {got['tokens_per_s']:.0f} | "
              f"{got['tokens_per_s'] / used:.0f} | {got['tokens_per_s'] / base:.2f}x |")
    full, own = results[(1, 1, args.batch_size)]["step_s"], results[(1, 1, half)]["step_s"]
    print(f"\ntwo Macs, the wire free: a step of {own * 1000:.0f} ms (one rank's half batch) against "
          f"{full * 1000:.0f} ms, {full / own:.2f}x")
    payload = results[(2, 1, args.batch_size)]["gradient_bytes"]
    print(f"\nexchanged per step: the LoRA gradients, {payload / 2**20:.2f} MiB of float32 (an all-reduce over "
          f"2 ranks sends and receives {payload / 2**20:.2f} MiB per rank), plus one of four scalars")


if __name__ == "__main__":
    main()

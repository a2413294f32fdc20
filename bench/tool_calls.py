"""Tool calls before and after KD: the student's greedy calls on held-out tool-use prompts against the
teacher's, and the held-out KL, as the retrain gate measures them.

The prompts are the kit corpus's `action` tool-use asks (two tools offered each). The teacher answers
every prompt greedily (`--tool-choice`: "auto", "required" or "named", the prompt's own tool forced
by name as an agent's `tool_choice` would); only answers whose calls parse become traces, since the
metric compares with the teacher's calls. The student then trains on the train share by KD and is
measured on the held-out share before and after (its calls unforced: "auto", as an agent asks).

    python bench/tool_calls.py                                        # the tiny kit
    python bench/tool_calls.py --pair-dir /tmp/pair --tool-choice named --iters 60
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from conch_dna.kit import corpus
from conch_dna.models.chat import split_prompts
from conch_dna.traces.ego import Ego
from conch_dna.training.true_kd import DistillOptions, KDConfig, TrueKnowledgeDistiller

from pair_args import add_model_args, parse_model_args


def teacher_traces(teacher: str, prompts: list[dict], max_tokens: int, tool_choice: str) -> list[dict]:
    """The teacher's answers to the prompts, as traces, where they are tool calls that parse."""
    with tempfile.TemporaryDirectory() as home:
        ego = Ego(teacher, home=home, max_tokens=max_tokens)
        try:
            traces = []
            for p in prompts:
                answer = ego.answer(p["messages"], max_tokens, p["tools"], _choice(p, tool_choice))
                if answer.tool_calls:
                    traces.append({"messages": [*p["messages"], answer.message()], "tools": p["tools"]})
            return traces
        finally:
            ego.close()


def _choice(prompt: dict, tool_choice: str):
    """OpenAI's tool_choice for a prompt: as given, or, for "named", the tool its ask names."""
    if tool_choice != "named":
        return tool_choice
    name = {"Email": "send_email"}.get(prompt["messages"][1]["content"].split()[0])
    name = name or prompt["messages"][1]["content"].split()[1] + "_file"  # "Please read x" -> read_file
    return {"type": "function", "function": {"name": name}}


def row(label: str, metrics: dict) -> str:
    calls = metrics["tool_calls"]
    return (f"| {label} | {metrics['kl']:.4f} | {metrics['agreement']:.1%} | {calls['parsed']:.1%} | "
            f"{calls['name']:.1%} | {calls['arguments']:.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, domains="action")
    p.add_argument("--heldout-fraction", type=float, default=0.25)
    p.add_argument("--tool-choice", default="auto", choices=("auto", "required", "named"),
                   help="how the teacher is asked for its calls")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--max-answer-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = parse_model_args(p)
    prompts = corpus.tool_prompts(args.prompts, seed=1000 + args.seed)
    tic = time.perf_counter()
    traces = teacher_traces(args.teacher, prompts, args.max_answer_tokens, args.tool_choice)
    print(f"teacher: {len(traces)} of {len(prompts)} answers are tool calls that parse "
          f"(tool_choice {args.tool_choice}, {time.perf_counter() - tic:.0f} s)")
    train, held = split_prompts(traces, args.heldout_fraction)
    if not train or not held:
        raise SystemExit(f"too few tool-call traces to split: {len(train)} train, {len(held)} held-out")
    config = KDConfig(num_iters=args.iters, learning_rate=args.learning_rate, lora_rank=args.lora_rank,
                      lora_layers=1024, max_answer_tokens=args.max_answer_tokens, steps_per_report=args.iters,
                      on_policy=0.0, hidden_weight=0.0, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        distiller = TrueKnowledgeDistiller(args.teacher, args.student, config, output_dir=tmp,
                                           cache_dir=Path(tmp) / "teacher_cache")
        tic = time.perf_counter()
        result = distiller.distill_domain("action", train, held, DistillOptions(
            adapter_dir=Path(tmp) / "adapter", measure_on_policy=False))
    print(f"KD: {len(train)} train traces, {len(held)} held-out, {args.iters} steps "
          f"({time.perf_counter() - tic:.0f} s)\n")
    print("| student | held-out KL | top-1 | calls that parse | teacher's function | teacher's arguments |")
    print("|---|---:|---:|---:|---:|---:|")
    print(row("before KD", result.heldout_before))
    print(row("after KD", result.heldout_after))


if __name__ == "__main__":
    main()

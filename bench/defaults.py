"""Which KD settings should be the defaults: each candidate trained over seeds on the tuning prompts, judged on
prompts kept apart from every set a default was ever tuned on (bench/kept_apart/, see its README).

Every arm starts from the bare student and trains a fresh LoRA on a domain's tuning prompts (the kit's seed
prompts, DOMAIN_PROMPTS: what the README's studies tuned on) for --iters steps, with KDConfig's defaults but
for the arm's own settings; it is then measured on the domain's kept-apart prompts as the retrain gate
measures a candidate: teacher-forced (KL, CE and top-1 against the teacher's answers), on-policy (its own
greedy answers scored by the teacher) and the answer checks the gate applies to those answers (repeated word
4-grams, distinct bigrams, answers that end, length against the teacher's, token entropy against the
teacher's). Each figure is the mean over seeds ± its spread (the sample standard deviation); the first
kept-apart prompt's answer of each arm is printed beside them, to read.

    python bench/defaults.py                                  # the tiny kit
    python bench/defaults.py --pair-dir /tmp/pair --domains task,thinking --seeds 3 --cache-dir /tmp/pair_cache
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from conch_dna.kit.seeds import DOMAIN_PROMPTS
from conch_dna.models.chat import to_chat
from conch_dna.training.on_policy import answer_tokens
from conch_dna.training.true_kd import DistillOptions, KDConfig, TrueKnowledgeDistiller

from pair_args import add_model_args, parse_model_args

KEPT_APART = Path(__file__).resolve().parent / "kept_apart" / "prompts.jsonl"

# the candidates: KDConfig fields each arm sets over the defaults
ARMS = {
    "classical KD": {"on_policy": 0.0, "hidden_weight": 0.0},
    "hidden 0.1 (depth)": {"on_policy": 0.0, "hidden_weight": 0.1, "hidden_layer_map": "depth"},
    "hidden 0.1 (origin)": {"on_policy": 0.0, "hidden_weight": 0.1, "hidden_layer_map": "origin"},
    "on-policy 0.5x8 + hidden 0.1": {"on_policy": 0.5, "on_policy_rounds": 8, "hidden_weight": 0.1},
    "on-policy 0.25x8 + hidden 0.1": {"on_policy": 0.25, "on_policy_rounds": 8, "hidden_weight": 0.1},
    # around the winner of those: one setting moved at a time
    "hidden 0.1 + lr 1e-4": {"on_policy": 0.0, "hidden_weight": 0.1, "learning_rate": 1e-4},
    "hidden 0.1 + lr 4e-4": {"on_policy": 0.0, "hidden_weight": 0.1, "learning_rate": 4e-4},
    "hidden 0.1 + T 1": {"on_policy": 0.0, "hidden_weight": 0.1, "temperature": 1.0},
    "hidden 0.1 + alpha 0.5": {"on_policy": 0.0, "hidden_weight": 0.1, "alpha": 0.5},
    "hidden 0.1 + alpha 0.9": {"on_policy": 0.0, "hidden_weight": 0.1, "alpha": 0.9},
}

# (column, where it is read from a run's held-out metrics, digits)
MEASURES = [
    ("KL", lambda m: m["kl"], 3), ("CE", lambda m: m["ce"], 3), ("top-1", lambda m: 100 * m["agreement"], 1),
    ("on-policy KL", lambda m: m["on_policy"]["kl"], 3),
    ("on-pol top-1", lambda m: 100 * m["on_policy"]["agreement"], 1),
    ("rep 4-gr", lambda m: m["answers"]["repeated_4grams"], 3),
    ("distinct-2", lambda m: m["answers"]["distinct_2"], 3),
    ("ended %", lambda m: 100 * m["answers"]["ended"], 0),
    ("len/teacher", lambda m: m["answers"]["tokens"] / m["answers"]["teacher_tokens"], 2),
    ("H/teacher", lambda m: m["answers"]["entropy"] / m["answers"]["teacher_entropy"], 2),
]


def kept_apart(domain: str) -> list[str]:
    rows = [json.loads(line) for line in KEPT_APART.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows if r["domain"] == domain]
    if not prompts:
        raise SystemExit(f"{KEPT_APART} holds no prompt of domain {domain!r}")
    return prompts


def pooled(runs: list[dict], read) -> float:
    """A measure over a seed's domains, weighted by each domain's held-out tokens."""
    tokens = [m["tokens"] for m in runs]
    return sum(read(m) * t for m, t in zip(runs, tokens)) / sum(tokens)


def spread(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def first_answer(distiller: TrueKnowledgeDistiller, adapter, domain: str, prompt: str, max_tokens: int) -> str:
    model, tokenizer, _ = distiller.load_student(adapter)
    _, answer = answer_tokens(model, tokenizer, [to_chat(domain, prompt)], max_tokens, 0.0, 0)[0]
    eos = set(tokenizer.eos_token_ids)
    return tokenizer.decode([t for t in answer if t not in eos])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, domains="task,thinking", prompts=64)
    p.add_argument("--iters", type=int, default=60, help="training steps of every arm")
    p.add_argument("--learning-rate", type=float, help="every arm's (default: KDConfig's)")
    p.add_argument("--max-answer-tokens", type=int, default=48, help="the teacher's and the student's answers")
    p.add_argument("--seeds", type=int, default=3, help="each arm trains with seeds 0..N-1 (LoRA init, batch order)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {'; '.join(ARMS)}")
    p.add_argument("--cache-dir", help="teacher cache to reuse between runs (default: a temporary one)")
    p.add_argument("--json", help="also write every run's metrics here, after each arm's seed")
    p.add_argument("--table", help="print the table of a --json file (a run cut short: the seeds it finished)")
    p.add_argument("--teacher-answers", metavar="FILE",
                   help="only write the teacher's greedy answers to every kept-apart prompt (all domains) to FILE")
    args = parse_model_args(p)
    if args.teacher_answers:
        return write_teacher_answers(args.teacher, args.max_answer_tokens, Path(args.teacher_answers))
    arms = [a.strip() for a in args.arms.split(",")]
    if unknown := [a for a in arms if a not in ARMS]:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {list(ARMS)}")
    base = replace(KDConfig(), num_iters=args.iters, max_answer_tokens=args.max_answer_tokens,
                   sample_max_tokens=args.max_answer_tokens, steps_per_report=args.iters,
                   **({"learning_rate": args.learning_rate} if args.learning_rate else {}))
    domains = args.domains.split(",")
    held = {d: kept_apart(d) for d in domains}
    if args.table:
        data = json.loads(Path(args.table).read_text())
        runs = {arm: {int(k): v for k, v in by_seed.items()} for arm, by_seed in data["runs"].items()}
        return table(args, base, held, data["before"], runs, data["seconds"], data["answers"])
    # arm -> seed -> the domains' held-out metrics after; the bare student's before; seconds; answers to read
    runs: dict[str, dict[int, list[dict]]]
    before: list[dict] = []
    answers: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "teacher_cache"
        runs, seconds = {arm: {} for arm in arms}, {arm: [] for arm in arms}
        for seed in range(args.seeds):  # seed by seed, so that a run cut short has every arm's first seeds
            for arm in arms:
                config = replace(base, **ARMS[arm], seed=seed)
                runs[arm][seed], tic = [], time.perf_counter()
                for domain in domains:
                    distiller = TrueKnowledgeDistiller(args.teacher, args.student, config, output_dir=tmp,
                                                       cache_dir=cache)
                    out = Path(tmp) / arm.replace(" ", "_") / str(seed) / domain
                    train = DOMAIN_PROMPTS[domain]["examples"][: args.prompts]
                    result = distiller.distill_domain(domain, train, held[domain], DistillOptions(adapter_dir=out))
                    runs[arm][seed].append(result.heldout_after)
                    if seed == 0 and arm == arms[0]:
                        before.append(result.heldout_before)
                    if seed == 0 and domain == domains[0]:
                        if arm == arms[0]:
                            answers["base student"] = first_answer(distiller, None, domain, held[domain][0],
                                                                   args.max_answer_tokens)
                        answers[arm] = first_answer(distiller, out, domain, held[domain][0], args.max_answer_tokens)
                seconds[arm].append(time.perf_counter() - tic)
                print(f"{arm} / seed {seed}: done in {seconds[arm][-1]:.0f} s", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"before": before, "runs": runs, "seconds": seconds,
                                                           "answers": answers}, indent=1))
    table(args, base, held, before, runs, seconds, answers)


# the teacher's row: its own answers' checks under the answer-check columns, nothing under the KL ones
TEACHER_CELLS = [(None, 0)] * 5 + [("repeated_4grams", 3), ("distinct_2", 3), ("ended", 0), (None, 0), (None, 0)]
TEACHER_ANSWERS = KEPT_APART.parent / "teacher_answers.jsonl"


def teacher_checks(tokenizer_from: str, domains: list[str]) -> dict | None:
    """The answer checks of the teacher's kept-apart answers (TEACHER_ANSWERS), where written, of `domains`."""
    if not TEACHER_ANSWERS.exists():
        return None
    from conch_dna.models.loading import load_tokenizer_only
    from conch_dna.training.evaluation import answer_checks

    tokenizer = load_tokenizer_only(tokenizer_from)
    eos = sorted(tokenizer.eos_token_ids)[0]
    rows = [json.loads(line) for line in TEACHER_ANSWERS.read_text().splitlines() if line.strip()]
    answers = []
    for row in (r for r in rows if r["domain"] in domains):
        tokens = tokenizer.encode(row["answer"], add_special_tokens=False)
        answers.append(tokens + [eos] if len(tokens) < row["max_tokens"] else tokens)  # it stopped: it ended
    checks = answer_checks(tokenizer, answers)
    return {**checks, "ended": 100 * checks["ended"]}


def write_teacher_answers(teacher: str, max_tokens: int, out: Path) -> None:
    """What the teacher answers each kept-apart prompt: greedy, through the chat template a run uses (the same
    answers a run generates and caches for them), one JSON line each, for reading beside the students'."""
    from conch_dna.models.chat import prompt_tokens
    from conch_dna.models.loading import load_model

    from mlx_lm import generate

    model, tokenizer = load_model(teacher)
    rows = [json.loads(line) for line in KEPT_APART.read_text().splitlines() if line.strip()]
    with out.open("w") as f:
        for row in rows:
            chat = to_chat(row["domain"], row["prompt"])
            prompt = prompt_tokens(tokenizer, chat.messages, chat.tools)
            answer = generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens, verbose=False)
            f.write(json.dumps({**row, "max_tokens": max_tokens, "answer": answer}) + "\n")
    print(f"{len(rows)} answers of {teacher} -> {out}")


def table(args, base: KDConfig, held: dict, before: list[dict], runs: dict, seconds: dict, answers: dict) -> None:
    """The markdown table of the arms over the seeds each has finished, and the answers to read."""
    domains = args.domains.split(",")
    n_held = sum(len(v) for v in held.values())
    print(f"\nteacher {args.teacher}\nstudent {args.student}\ndomains {args.domains}: {args.prompts} tuning prompts "
          f"each (DOMAIN_PROMPTS), {n_held} kept-apart prompts ({KEPT_APART.parent.name}/); {args.iters} steps, "
          f"lr {base.learning_rate:g}, LoRA rank {base.lora_rank} on {base.lora_layers} blocks, T {base.temperature}, "
          f"alpha {base.alpha}, answers <= {args.max_answer_tokens} tokens; {args.seeds} seed(s), mean ± sd")
    head = f"| arm | {' | '.join(name for name, _, _ in MEASURES)} | s per seed |"
    print(head + "\n|" + "---|" * (len(MEASURES) + 2))
    if (teacher := teacher_checks(args.student, domains)) is not None:
        cells = [f"{teacher[key]:.{digits}f}" if key else "" for key, digits in TEACHER_CELLS]
        print(f"| teacher | {' | '.join(cells)} | |")
    base_row = [f"{pooled(before, read):.{digits}f}" for _, read, digits in MEASURES]
    print(f"| base student | {' | '.join(base_row)} | |")
    for arm, by_seed in runs.items():
        done = [r for r in by_seed.values() if len(r) == len(domains)]
        if not done:
            continue
        cells = [spread([pooled(r, read) for r in done], digits)
                 for _, read, digits in MEASURES]
        print(f"| {arm} | {' | '.join(cells)} | {statistics.fmean(seconds[arm]):.0f} ({len(done)} seeds) |")
    print(f"\nthe first kept-apart prompt of {domains[0]}: {held[domains[0]][0]!r}")
    for name, text in answers.items():
        print(f"  {name}: {text[:300]!r}")


if __name__ == "__main__":
    main()

"""On-policy KD against off-policy KD and SFT, at equal teacher passes and equal training steps.

As in the daemon, every method retrains a domain's current version: a warm-up round of off-policy KD
on the first half of the train prompts makes that version, then each method trains it for --iters
steps on the second half, where every prompt costs one teacher pass over one answer:
  - SFT: α = 0, cross-entropy on the teacher's answers;
  - off-policy KD: λ = 0, the teacher's answers and top-k;
  - on-policy KD at each --lambdas λ: that share of the prompts answered by the student itself
    (sampled at --sample-temperature), the teacher scoring every token of those answers; with
    --rounds R, a share answered at the start of each of R rounds by the student as it stands.
With --seeds N every method trains N times (seeds 0..N-1) from the same current version: one
real-pair student's held-out KL moves by several percent between seeds at these step counts.
Each candidate is measured on the held-out prompts twice: teacher-forced (the teacher's answers) and
on-policy (its own greedy answers, scored by the teacher), as the retrain gate measures it.

    python bench/on_policy.py                                  # the tiny kit
    python bench/on_policy.py --pair-dir /tmp/pair --domains task --cache-dir /tmp/pair_cache
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from conch_dna.kit.seeds import DOMAIN_PROMPTS
from conch_dna.training.true_kd import DistillOptions, KDConfig, TrueKnowledgeDistiller, split_prompts

from pair_args import add_model_args, parse_model_args


def pooled(results, side: str, on_policy: bool) -> dict:
    """Token-weighted means of a side's held-out metrics over the domains' results."""
    rows = [(r.heldout_after if side == "after" else r.heldout_before) for r in results]
    rows = [m["on_policy"] if on_policy else m for m in rows]
    tokens = sum(m["tokens"] for m in rows)
    return {k: sum(m[k] * m["tokens"] for m in rows) / tokens for k in ("kl", "ce", "agreement")} | {"tokens": tokens}


def parse_method(text: str, rounds: int) -> tuple[float, int]:
    """(λ, rounds) of a --lambdas entry: "0.5" (the default rounds) or "0.5x8"."""
    lam, _, own = text.partition("x")
    return float(lam), int(own) if own else rounds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--heldout-fraction", type=float, default=0.25)
    p.add_argument("--warmup-iters", type=int, default=60, help="steps of the round that makes the current version")
    p.add_argument("--iters", type=int, default=60, help="steps of each method's retrain")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--max-answer-tokens", type=int, default=64)
    p.add_argument("--sample-max-tokens", type=int, default=64)
    p.add_argument("--sample-temperature", type=float, default=1.0)
    p.add_argument("--lambdas", default="0.5,1.0",
                   help="on-policy methods: λ, or λxR for λ in R rounds (default rounds: --rounds), e.g. 0.5,1.0x8")
    p.add_argument("--rounds", type=int, default=1, help="on_policy_rounds of the on-policy methods")
    p.add_argument("--seeds", type=int, default=1, help="train each method with seeds 0..N-1 (LoRA init, batch "
                   "order, samples) from the same current version; the table pools them, the ratios come per seed")
    p.add_argument("--sft", action=argparse.BooleanOptionalAction, default=True,
                   help="train SFT too (--no-sft: off-policy and on-policy KD only, the comparison the goal is on)")
    p.add_argument("--cache-dir", help="teacher cache to reuse between runs (default: a temporary one)")
    args = parse_model_args(p)
    base = KDConfig(learning_rate=args.learning_rate, lora_rank=args.lora_rank, lora_layers=1024,
                    max_answer_tokens=args.max_answer_tokens, sample_max_tokens=args.sample_max_tokens,
                    sample_temperature=args.sample_temperature, steps_per_report=max(args.iters, args.warmup_iters),
                    hidden_weight=0.0, on_policy=0.0)  # as measured in the README: the logit loss alone;
    # the warm-up and "off-policy kd" are λ = 0 whatever KDConfig's default
    methods = ({"sft (alpha 0)": replace(base, alpha=0.0)} if args.sft else {}) | {"off-policy kd": base}
    for lam, rounds in (parse_method(x, args.rounds) for x in args.lambdas.split(",")):
        methods[f"on-policy kd, lambda {lam:g}" + (f" x{rounds}" if rounds != args.rounds else "")] = replace(
            base, on_policy=lam, on_policy_rounds=rounds)
    domains = args.domains.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "teacher_cache"
        data, warm = {}, {}
        for domain in domains:
            train, held = split_prompts(DOMAIN_PROMPTS[domain]["examples"][: args.prompts], args.heldout_fraction)
            half = len(train) // 2
            data[domain] = (train[:half], train[half:], held)
            warmup = TrueKnowledgeDistiller(args.teacher, args.student, replace(base, num_iters=args.warmup_iters),
                                            output_dir=tmp, cache_dir=cache)
            warm[domain] = warmup.distill_domain(domain, train[:half], held, DistillOptions(
                adapter_dir=Path(tmp) / "warm" / domain))
        results, by_seed = {}, {}  # name -> results over seeds and domains; (name, seed) -> over domains
        for name, config in methods.items():
            results[name] = []
            for seed in range(args.seeds):
                by_seed[name, seed] = []
                for domain in domains:
                    _, new, held = data[domain]
                    distiller = TrueKnowledgeDistiller(args.teacher, args.student,
                                                       replace(config, num_iters=args.iters, seed=seed),
                                                       output_dir=tmp, cache_dir=cache)
                    options = DistillOptions(warm_start=Path(tmp) / "warm" / domain,
                                             adapter_dir=Path(tmp) / name.replace(" ", "_") / str(seed) / domain)
                    by_seed[name, seed].append(distiller.distill_domain(domain, new, held, options))
                    print(f"{name} / seed {seed} / {domain}: done", flush=True)
                results[name] += by_seed[name, seed]

    first = next(iter(results.values()))
    print(f"\nteacher {args.teacher}\nstudent {args.student}")
    print(f"domains {args.domains}: warm-up {args.warmup_iters} steps of off-policy KD on "
          f"{sum(len(d[0]) for d in data.values())} train prompts; then each method {args.iters} steps on "
          f"{sum(len(d[1]) for d in data.values())} new prompts, one teacher pass each; "
          f"{sum(len(d[2]) for d in data.values())} held-out prompts. lr {args.learning_rate}, LoRA rank "
          f"{args.lora_rank} on every layer, T {base.temperature}, alpha {base.alpha}, answers <= "
          f"{args.max_answer_tokens} (teacher) / {args.sample_max_tokens} (student, T {args.sample_temperature}), "
          f"on-policy answers in {args.rounds} round(s)")
    print(f"{'':28s} {'scored':>6s} {'held-out KL':>11s} {'top-1':>7s} {'on-policy KL':>12s} {'top-1':>7s} "
          f"{'own tokens':>10s} {'sample/teacher/train/eval s':>28s}")
    rows = [("current version (warm-up)", first, "before")] + [(n, r, "after") for n, r in results.items()]
    for name, rs, side in rows:
        tf, op = pooled(rs, side, False), pooled(rs, side, True)
        scored = sum(r.num_examples for r in rs) if side == "after" else 0
        phases = "/".join(f"{sum((r.phase_seconds or {}).get(k, 0) for r in rs):.0f}"
                          for k in ("sample", "teacher", "train", "evaluate")) if side == "after" else ""
        print(f"{name:28s} {scored:6d} {tf['kl']:11.4f} {tf['agreement']:7.1%} {op['kl']:12.4f} "
              f"{op['agreement']:7.1%} {op['tokens']:10d} {phases:>28s}")
    off = pooled(results["off-policy kd"], "after", True)["kl"]
    off_tf = pooled(results["off-policy kd"], "after", False)["kl"]
    for name, rs in results.items():
        if name.startswith("on-policy"):
            op, tf = pooled(rs, "after", True)["kl"], pooled(rs, "after", False)["kl"]
            seeds = [100 * (1 - pooled(by_seed[name, k], "after", True)["kl"]
                            / pooled(by_seed["off-policy kd", k], "after", True)["kl"]) for k in range(args.seeds)]
            print(f"{name}: on-policy held-out KL {100 * (1 - op / off):.1f}% below off-policy KD's "
                  f"(seed by seed: {', '.join(f'{x:.1f}%' for x in seeds)}); teacher-forced "
                  f"{100 * (1 - tf / off_tf):.1f}% below")


if __name__ == "__main__":
    main()

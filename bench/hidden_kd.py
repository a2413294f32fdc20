"""Logits-only KD against KD plus the hidden-state (layer-wise) loss, at equal steps.

Each variant trains a fresh LoRA on the same student for --iters steps on the same prompts, batches
and teacher targets, and is measured on the same held-out prompts (KL to the teacher at T = 1 over
its top-k + tail, and top-1 agreement). The hidden-state variants add --weights × the loss at the
default layer map (4 student layers evenly spaced, each with the teacher's at the same depth; with
--layer-maps depth,origin also with the teacher block each was cut from, for a student that records its cut).
Prints the teacher cache's bytes per answer token of the hidden states next to the top-k's.

    python bench/hidden_kd.py                                        # the tiny kit
    python bench/hidden_kd.py --pair-dir /tmp/pair --domains task --cache-dir /tmp/pair_cache
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from conch_dna.kit.seeds import DOMAIN_PROMPTS
from conch_dna.training.hidden import HIDDEN_LAYER_MAPS, HIDDEN_LOSSES
from conch_dna.training.targets.teacher import HIDDEN_SUFFIX, TARGET_SUFFIX
from conch_dna.training.targets.topk_codec import decode_topk
from conch_dna.training.true_kd import DistillOptions, KDConfig, TrueKnowledgeDistiller, split_prompts

from pair_args import add_model_args, parse_model_args
from safetensors.numpy import load_file


def per_token(cache: Path, suffix: str) -> tuple[int, int, int]:
    """(files, bytes, answer-token rows) of one kind of teacher-cache entry."""
    files = sorted(cache.rglob(f"*{suffix}"))
    rows = 0
    for f in files:
        if suffix == HIDDEN_SUFFIX:
            rows += load_file(str(f))["hidden"].shape[0]
        else:
            rows += decode_topk(f.read_bytes())[0].shape[0]
    return len(files), sum(f.stat().st_size for f in files), rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--max-answer-tokens", type=int, default=64)
    p.add_argument("--weights", default="0.1,1.0", help="hidden-state loss weights to compare with 0")
    p.add_argument("--hidden-loss", default="mse", choices=HIDDEN_LOSSES)
    p.add_argument("--layer-maps", default="depth",
                   help=f"default layer maps to compare: {', '.join(HIDDEN_LAYER_MAPS)}")
    p.add_argument("--seeds", type=int, default=1, help="train each variant with seeds 0..N-1 (LoRA init, batch "
                   "order); KL is compared seed by seed")
    p.add_argument("--cache-dir", help="teacher cache to reuse between runs (default: a temporary one)")
    args = parse_model_args(p)
    base = KDConfig(learning_rate=args.learning_rate, lora_rank=8, lora_layers=1024, num_iters=args.iters,
                    max_answer_tokens=args.max_answer_tokens, steps_per_report=args.iters,
                    hidden_weight=0.0, hidden_loss=args.hidden_loss, on_policy=0.0)  # off-policy, as measured
    maps = args.layer_maps.split(",")
    variants = {"logits only": base} | {
        f"+ hidden {args.hidden_loss}, weight {w:g}" + (f", {m} map" if len(maps) > 1 else ""):
            replace(base, hidden_weight=w, hidden_layer_map=m)
        for w in (float(x) for x in args.weights.split(",")) for m in maps}
    runs = {}  # (variant, seed) -> (metrics, metrics before, tokens)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache_dir or Path(tmp) / "teacher_cache")
        for seed in range(args.seeds):
            for name, config in variants.items():
                distiller = TrueKnowledgeDistiller(args.teacher, args.student, replace(config, seed=seed),
                                                   output_dir=Path(tmp) / f"{name} {seed}", cache_dir=cache)
                results = []
                for domain in args.domains.split(","):
                    train, held = split_prompts(DOMAIN_PROMPTS[domain]["examples"][: args.prompts], 0.25)
                    results.append(distiller.distill_domain(domain, train, held,
                                                            DistillOptions(measure_on_policy=False)))
                tokens = sum(r.heldout_after["tokens"] for r in results)
                runs[name, seed] = ({k: sum(r.heldout_after[k] * r.heldout_after["tokens"] for r in results) / tokens
                                     for k in ("kl", "agreement")}, results[0].heldout_before)
                print(f"{name}, seed {seed}: KL {runs[name, seed][0]['kl']:.4f}", flush=True)
        sizes = {suffix: per_token(cache, suffix) for suffix in (TARGET_SUFFIX, HIDDEN_SUFFIX)}

    print(f"\nteacher {args.teacher}\nstudent {args.student}\ndomains {args.domains}, {args.iters} steps each, "
          f"lr {args.learning_rate}, LoRA rank 8 on every layer, T {base.temperature}, alpha {base.alpha}, "
          f"seeds 0..{args.seeds - 1}")
    before = runs["logits only", 0][1]
    print(f"{'':32s} {'held-out KL':>11s} {'top-1':>7s}   (means over seeds)\n{'student before':32s} "
          f"{before['kl']:11.4f} {before['agreement']:7.1%}")
    seeds = range(args.seeds)
    for name in variants:
        kl = sum(runs[name, s][0]["kl"] for s in seeds) / args.seeds
        top1 = sum(runs[name, s][0]["agreement"] for s in seeds) / args.seeds
        change = ""
        if name != "logits only":
            ratios = [100 * (runs[name, s][0]["kl"] / runs["logits only", s][0]["kl"] - 1) for s in seeds]
            change = (f"   KL against logits only, seed by seed: mean {sum(ratios) / len(ratios):+.1f}% "
                      f"({', '.join(f'{r:+.1f}%' for r in ratios)})")
        print(f"{name:32s} {kl:11.4f} {top1:7.1%}{change}")
    for suffix, (files, size, rows) in sizes.items():
        if rows:
            print(f"teacher cache {suffix}: {files} files, {size / rows:.0f} bytes per answer token")


if __name__ == "__main__":
    main()

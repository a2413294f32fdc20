"""What `auto/<domain>` serves from a distilled student, and what it saves: its acceptance rule fitted on half of
prompts it never trained on and judged on the other half, the whole curve of share served against the accepted
answers' quality, and the wall time of student-first against always asking the teacher, same prompts, one run.

Each domain's student is distilled from the bare student on its tuning prompts (DOMAIN_PROMPTS, as
bench/defaults.py does), then answers the kept-apart prompts (bench/kept_apart/) greedily; the teacher scores
every answer (the run's on-policy pass), so each answer has the student's confidence (its mean token
log-probability), its teacher-scored KL per token and top-1 agreement, whether it ended and how it repeats
(evaluation.answer_scores: what a gate fits the rule on). The rule (lifecycle.acceptance.fit_acceptance) is
fitted on one half of the answers and applied to the other, both ways round, at each bound; then the curve.
The bare student has no rule: it defers every call by design.

Wall time: the distilled adapters promoted into a scratch home with the rule fitted on the first half, the
second half's prompts asked one at a time as an agent would, of the teacher alone (Ego.answer) and of
`neurons.get(d).generate(..., defer="auto")` (student first, the teacher for what it refuses), one after the
other in one run.

    python bench/cascade.py                                   # the tiny kit
    python bench/cascade.py --pair-dir /tmp/pair --cache-dir /tmp/pair_cache --max-answer-tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from conch_dna.kit.seeds import DOMAIN_PROMPTS
from conch_dna.lifecycle.acceptance import accepts, fit_acceptance, write_acceptance
from conch_dna.models.versions import domain_dir, promote
from conch_dna.settings.config import Config
from conch_dna.training.evaluation import answer_checks
from conch_dna.training.true_kd import DistillOptions, KDConfig, TrueKnowledgeDistiller

from defaults import kept_apart
from pair_args import add_model_args, parse_model_args


def served(rule: dict, scores: list[dict]) -> tuple[float, float | None, float | None]:
    """(share of `scores` the rule accepts, their mean KL per token, their mean top-1 agreement)."""
    taken = [s for s in scores if accepts(rule, s)]
    if not taken:
        return 0.0, None, None
    return len(taken) / len(scores), statistics.fmean(s["kl"] for s in taken), statistics.fmean(
        s["agreement"] for s in taken)


def cell(value: float | None, form: str = ".3f") -> str:
    return "-" if value is None else format(value, form)


def wall_times(args, tmp: Path, runs: dict) -> None:
    """Teacher alone against student first on the judged half, one prompt at a time, in one process."""
    from conch_dna.traces.ego import Ego

    from neurons import NeuronRegistry

    home = tmp / "home"
    home.mkdir(mode=0o700)
    domains = list(runs)
    (home / "config.toml").write_text(f'teacher = "{args.teacher}"\nstudent = "{args.student}"\n'
                                      f"domains = {domains!r}\n".replace("'", '"'))
    for domain, (adapter, rule, _) in runs.items():
        promote(home, domain, adapter, "bench")
        write_acceptance(domain_dir(home, domain) / "v0001", rule)
    asks = [(d, p) for d, (_, _, judged) in runs.items() for p in judged]
    ego, registry = Ego(home=home), NeuronRegistry(home, watch=False)
    try:
        ego.answer([{"role": "user", "content": "warm up"}], 4)
        registry.get(domains[0]).generate("warm up", max_tokens=4)
        from conch_dna.models.chat import to_chat

        tic, theirs = time.perf_counter(), []
        for domain, prompt in asks:
            theirs.append(ego.answer(to_chat(domain, prompt).messages, args.max_answer_tokens))
        teacher_s = time.perf_counter() - tic
        tic, by = time.perf_counter(), []
        for domain, prompt in asks:
            by.append(registry.get(domain).generate(prompt, max_tokens=args.max_answer_tokens, defer="auto"))
        auto_s = time.perf_counter() - tic
        verify_s = ego.mlx.call(teacher_prefills, ego, [(d, p, a) for (d, p), a in zip(asks, by)])
        own = [registry.get(d).submit(p, max_tokens=args.max_answer_tokens, logprobs=0) for d, p in asks]
        for call in own:
            list(call)
        checks = registry.deferral.tokenizer
        mine = [answer_checks(checks, [[t.token for t in call.token_logprobs]])["repeated_4grams"] for call in own]
        teachers = [answer_checks(checks, [checks.encode(a.text, add_special_tokens=False)])["repeated_4grams"]
                    for a in theirs]
    finally:
        registry.close()
        ego.close()
    student = sum(not a.deferred for a in by)
    limit = Config().auto_max_repeat
    print(f"\nrepeated token 4-grams of the judged answers (the rule takes at most {limit:g}): the student's "
          f"{sorted(round(r, 2) for r in mine)}, the teacher's {sorted(round(r, 2) for r in teachers)}")
    for (_, prompt), answer, call in list(zip(asks, by, own))[:: max(1, len(asks) // 6)]:
        print(f"  {prompt!r}\n    student [signal {answer.signal:.3f}]: {call.text[:200]!r}\n"
              f"    auto/ gave [{answer.answered_by}]: {str(answer)[:200]!r}")
    print(f"\nwall time, {len(asks)} judged prompts one at a time, {args.max_answer_tokens} tokens at most: teacher "
          f"alone {teacher_s:.1f} s, auto {auto_s:.1f} s (the student served {student} of {len(asks)}): "
          f"{auto_s / teacher_s:.2f}x; a verify mode's teacher pass over the prompt and the student's answer: "
          f"{verify_s:.1f} s in all ({verify_s / teacher_s:.2f}x the teacher writing)")


def teacher_prefills(ego, asked: list) -> float:
    """Seconds of one teacher forward pass over each prompt and the answer given (what a verify mode costs)."""
    from conch_dna.models.chat import prompt_tokens, to_chat

    import mlx.core as mx

    tic = time.perf_counter()
    for domain, prompt, answer in asked:
        ids = prompt_tokens(ego.tokenizer, to_chat(domain, prompt).messages) + ego.tokenizer.encode(
            str(answer), add_special_tokens=False)
        mx.eval(ego.model(mx.array([ids])))
    return time.perf_counter() - tic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, domains="task,thinking", prompts=32)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--max-answer-tokens", type=int, default=48)
    p.add_argument("--bounds", default="0.5,1.0,1.5", help="auto_max_kl values to fit at")
    p.add_argument("--cache-dir", help="teacher cache to reuse between runs")
    args = parse_model_args(p)
    config = replace(KDConfig(), num_iters=args.iters, max_answer_tokens=args.max_answer_tokens,
                     sample_max_tokens=args.max_answer_tokens, steps_per_report=args.iters)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scores, ended, runs = {}, {}, {}
        for domain in args.domains.split(","):
            distiller = TrueKnowledgeDistiller(args.teacher, args.student, config, output_dir=tmp,
                                               cache_dir=args.cache_dir or tmp / "cache")
            prompts = kept_apart(domain)
            result = distiller.distill_domain(domain, DOMAIN_PROMPTS[domain]["examples"][: args.prompts], prompts,
                                              DistillOptions(adapter_dir=tmp / domain))
            after = result.heldout_after
            scores[domain], ended[domain] = after["answer_scores"], after["answers"]["teacher_ended"]
            print(f"{domain}: {len(scores[domain])} kept-apart answers, held-out KL {after['kl']:.3f}, on-policy "
                  f"KL {after['on_policy']['kl']:.3f}; the teacher's answers that end within "
                  f"{args.max_answer_tokens} tokens: {ended[domain]:.0%}", flush=True)
            fit_on = scores[domain][0::2]
            runs[domain] = (tmp / domain, fit_acceptance(fit_on, Config(), ended[domain]), prompts[1::2])
        every = [s for d in scores for s in scores[d]]
        print(f"\nstudent {args.student}, {args.iters} steps; {len(every)} answers, the rule fitted per domain on "
              "one half, judged on the other (both ways round, pooled)")
        print("| bound (nats/token) | expected share (fit half) | share served (other half) | their KL | their "
              "top-1 | KL of every answer | verify would serve |\n|---|---|---|---|---|---|---|")
        for bound in (float(b) for b in args.bounds.split(",")):
            cfg, expected, taken, judged = Config(auto_max_kl=bound), [], [], 0
            for domain, got in scores.items():
                for fit_on, judge in ((got[0::2], got[1::2]), (got[1::2], got[0::2])):
                    rule = fit_acceptance(fit_on, cfg, ended[domain])
                    expected.append(rule["expected_share"] * len(fit_on))
                    taken += [s for s in judge if accepts(rule, s)]
                    judged += len(judge)
            kl = statistics.fmean(s["kl"] for s in taken) if taken else None
            top1 = statistics.fmean(s["agreement"] for s in taken) if taken else None
            verified = [s for s in every if s["kl"] <= bound and s["repeated_4grams"] <= cfg.auto_max_repeat]
            print(f"| {bound:g} | {sum(expected) / judged:.0%} | {len(taken) / judged:.0%} | {cell(kl)} | "
                  f"{cell(top1, '.1%')} | {statistics.fmean(s['kl'] for s in every):.3f} | "
                  f"{len(verified) / len(every):.0%} |")
        print("\nthe curve, every answer of each domain (its own end rule): threshold -> share served, their mean KL")
        for domain, got in scores.items():
            rule = fit_acceptance(got, Config(), ended[domain])
            print(f"  {domain} (ending {'required' if rule['require_end'] else 'not required'}; the fitted "
                  f"threshold {rule['threshold']:.3f} serves {rule['expected_share']:.0%}):")
            for threshold, share, kl in rule["curve"][:: max(1, len(rule["curve"]) // 12)]:
                print(f"    {threshold:8.3f} -> {share:4.0%}, {kl:.3f}")
        cfg = Config()
        print(f"never served: {sum(s['repeated_4grams'] > cfg.auto_max_repeat for s in every)} of {len(every)} "
              f"answers repeat over {cfg.auto_max_repeat:g}; {sum(not s['ended'] for s in every)} ran to "
              f"{args.max_answer_tokens} tokens")
        wall_times(args, tmp, runs)


if __name__ == "__main__":
    main()

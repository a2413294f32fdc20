"""True KD against SFT on the teacher's text, at equal steps on the same traces, as curves over steps.

For the same train traces (teacher answers) and the same held-out traces, prints held-out
KL(teacher ‖ student), CE on the teacher's tokens and top-1 agreement for:
  - no training (the student base),
  - SFT on the teacher's text with mlx-lm's own trainer (mlx_lm.tuner.trainer.train),
  - true KD (conch_dna's train_kd),
with the same LoRA shape, learning-rate schedule (warmup + cosine over --iters), batch size and
steps, measured along the run at --eval-at steps; then a few held-out answers as text.

    python bench/kd_vs_sft.py                     # the tiny kit, domains thinking + debug
    python bench/kd_vs_sft.py --real --domains task --prompts 40 --iters 200 --learning-rate 2e-4 \\
        --max-answer-tokens 48                    # SmolLM2-135M-Instruct -> its 15-layer cut
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from conch_dna.kit.seeds import DOMAIN_PROMPTS
from conch_dna.training.callbacks import KDCallback
from conch_dna.training.evaluation import heldout_metrics
from conch_dna.training.true_kd import (
    KDConfig,
    TrueKnowledgeDistiller,
    learning_rate_schedule,
    split_prompts,
    to_messages,
    train_kd,
)

import mlx.core as mx
import mlx.optimizers as optim
from mlx_lm import generate
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
from mlx_lm.tuner.trainer import TrainingArgs, train
from pair_args import add_model_args, parse_model_args


class EvalAt(TrainingCallback):
    """Held-out metrics at the chosen steps of an mlx-lm training run."""

    def __init__(self, model, examples, steps: set[int], curve: dict):
        self.model, self.examples, self.steps, self.curve = model, examples, steps, curve

    def on_train_loss_report(self, info: dict):
        if info["iteration"] in self.steps:
            self.curve[info["iteration"]] = heldout_metrics(self.model, self.examples)


def answer(model, tokenizer, messages, max_tokens: int) -> str:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens).strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--eval-at", default="", help="steps to measure at, e.g. 30,60,120,200 (default: the end)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--max-answer-tokens", type=int, default=96)
    p.add_argument("--show-answers", type=int, default=3, help="held-out answers printed as text")
    p.add_argument("--cache-dir", default=None, help="teacher cache to reuse between runs")
    args = parse_model_args(p)
    steps = sorted({int(s) for s in args.eval_at.split(",") if s} | {args.iters})
    config = KDConfig(num_iters=args.iters, learning_rate=args.learning_rate, temperature=args.temperature,
                      alpha=args.alpha, lora_rank=args.lora_rank, lora_layers=1024,
                      max_answer_tokens=args.max_answer_tokens, steps_per_report=10 if len(steps) > 1 else args.iters,
                      hidden_weight=0.0, on_policy=0.0)  # logits against tokens, off-policy (bench/hidden_kd.py
    # measures the hidden-state loss, bench/on_policy.py on-policy KD)

    with tempfile.TemporaryDirectory() as tmp:
        distiller = TrueKnowledgeDistiller(args.teacher, args.student, config, output_dir=tmp,
                                           cache_dir=args.cache_dir)
        train_examples, held_examples, train_chats, held_chats = [], [], [], []
        model, tokenizer, adapter_config = distiller.load_student()
        distiller.teachers.set_vocab_limit(int(model.args.vocab_size))
        tic = time.perf_counter()
        for domain in args.domains.split(","):
            prompts = DOMAIN_PROMPTS[domain]["examples"][: args.prompts]
            train_p, held_p = split_prompts(prompts, args.heldout_fraction)
            ex = distiller.teacher_examples(domain, train_p, tokenizer)
            train_examples += ex
            held = distiller.teacher_examples(domain, held_p, tokenizer)
            held_examples += held
            # the SFT side sees exactly the same token sequences as text the teacher wrote
            text = lambda e: tokenizer.decode(e.tokens[e.offset:].tolist(), skip_special_tokens=True).rstrip("\n")  # noqa: E731
            train_chats += [{"messages": [*to_messages(domain, p), {"role": "assistant", "content": text(e)}]}
                            for p, e in zip(train_p, ex)]
            held_chats += [(to_messages(domain, p), text(e)) for p, e in zip(held_p, held)]
        teacher_seconds = time.perf_counter() - tic
        distiller.teachers.release()

        base = heldout_metrics(model, held_examples)
        curves: dict[str, dict[int, object]] = {"sft (mlx-lm trainer)": {}, "true kd (conch_dna)": {}}
        sft_model, _, _ = distiller.load_student()
        dataset = CacheDataset(ChatDataset(train_chats, tokenizer, mask_prompt=True))
        tic = time.perf_counter()
        train(sft_model, optim.Adam(learning_rate=learning_rate_schedule(config)), dataset,
              args=TrainingArgs(batch_size=config.batch_size, iters=args.iters,
                                steps_per_report=config.steps_per_report, steps_per_save=10**9,
                                adapter_file=str(Path(tmp) / "sft.safetensors")),
              training_callback=EvalAt(sft_model, held_examples, set(steps), curves["sft (mlx-lm trainer)"]))
        sft_seconds = time.perf_counter() - tic
        sft_model.eval()

        kd_model, _, _ = distiller.load_student()
        kd_curve = curves["true kd (conch_dna)"]

        class Curve(KDCallback):
            def on_train_report(self, report):
                if report["iteration"] in steps:
                    kd_curve[report["iteration"]] = heldout_metrics(kd_model, held_examples)

        tic = time.perf_counter()
        train_kd(kd_model, train_examples, config, adapter_config, callbacks=Curve())
        kd_seconds = time.perf_counter() - tic
        samples = [(messages, teacher_text, answer(model, tokenizer, messages, args.max_answer_tokens),
                    answer(sft_model, tokenizer, messages, args.max_answer_tokens),
                    answer(kd_model, tokenizer, messages, args.max_answer_tokens))
                   for messages, teacher_text in held_chats[: args.show_answers]]

    print(f"\nteacher {args.teacher}\nstudent {args.student}")
    print(f"domains {args.domains}: {len(train_examples)} train traces, {len(held_examples)} held-out traces "
          f"({base.tokens} answer tokens, answers <= {args.max_answer_tokens}); {args.iters} steps each, batch "
          f"{config.batch_size}, lr {args.learning_rate} (warmup + cosine), LoRA rank {args.lora_rank} on every "
          f"layer, T {config.temperature}, alpha {config.alpha}")
    print(f"{'step':>5s} {'':22s} {'held-out KL':>12s} {'CE':>8s} {'top-1':>7s}")
    print(f"{0:5d} {'no training':22s} {base.kl:12.4f} {base.ce:8.4f} {base.agreement:7.1%}")
    for step in steps:
        for name, curve in curves.items():
            m = curve[step]
            print(f"{step:5d} {name:22s} {m.kl:12.4f} {m.ce:8.4f} {m.agreement:7.1%}")
    print("KD against SFT, held-out KL (and CE, top-1):")
    for step in steps:
        sft, kd = curves["sft (mlx-lm trainer)"][step], curves["true kd (conch_dna)"][step]
        print(f"  step {step:4d}: KD KL {100 * (1 - kd.kl / sft.kl):5.1f}% below SFT's; CE {kd.ce:.3f} vs "
              f"{sft.ce:.3f}; top-1 {kd.agreement:.1%} vs {sft.agreement:.1%}")
    print(f"time: teacher targets {teacher_seconds:.0f}s, sft {sft_seconds:.0f}s, kd {kd_seconds:.0f}s "
          "(both including the held-out evaluations)")
    for messages, teacher_text, before, sft_text, kd_text in samples:
        print(f"\nprompt:   {messages[-1]['content']}\nteacher:  {teacher_text}\nbase:     {before}\n"
              f"sft:      {sft_text}\nkd:       {kd_text}")
    mx.clear_cache()


if __name__ == "__main__":
    main()

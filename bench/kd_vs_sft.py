"""True KD against SFT on the teacher's text, at equal steps on the same traces.

For the same train traces (teacher answers) and the same held-out traces, prints held-out
KL(teacher ‖ student), CE on the teacher's tokens and top-1 agreement for:
  - no training (the student base),
  - SFT on the teacher's text with mlx-lm's own trainer (mlx_lm.tuner.trainer.train),
  - true KD (conch_dna's train_kd),
with the same LoRA shape, learning-rate schedule (warmup + cosine), batch size and number of steps.

    python bench/kd_vs_sft.py                     # the tiny kit, domains thinking + debug
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from conch_dna.evaluation import heldout_metrics
from conch_dna.kit import STUDENT_PATH, TEACHER_PATH
from conch_dna.training.distillation import DOMAIN_PROMPTS
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
from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
from mlx_lm.tuner.trainer import TrainingArgs, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=TEACHER_PATH)
    p.add_argument("--student", default=STUDENT_PATH)
    p.add_argument("--domains", default="thinking,debug")
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.7)
    args = p.parse_args()
    config = KDConfig(num_iters=args.iters, learning_rate=args.learning_rate, temperature=args.temperature,
                      alpha=args.alpha,
                      lora_rank=args.lora_rank, max_answer_tokens=96, steps_per_report=args.iters)

    with tempfile.TemporaryDirectory() as tmp:
        distiller = TrueKnowledgeDistiller(args.teacher, args.student, config, output_dir=tmp)
        train_examples, held_examples, train_chats = [], [], []
        model, tokenizer, adapter_config = distiller.load_student()
        distiller.scorer.vocab_limit = int(model.args.vocab_size)
        for domain in args.domains.split(","):
            train_p, held_p = split_prompts(DOMAIN_PROMPTS[domain]["examples"], args.heldout_fraction)
            ex = distiller.teacher_examples(domain, train_p, tokenizer)
            train_examples += ex
            held_examples += distiller.teacher_examples(domain, held_p, tokenizer)
            # the SFT side sees exactly the same token sequences as text the teacher wrote
            train_chats += [{"messages": [*to_messages(domain, p), {"role": "assistant", "content":
                             tokenizer.decode(e.tokens[e.offset:]).replace("<|im_end|>", "").rstrip("\n")}]}
                            for p, e in zip(train_p, ex)]
        distiller.scorer.release()

        rows = {"no training": heldout_metrics(model, held_examples)}

        sft_model, _, _ = distiller.load_student()
        dataset = CacheDataset(ChatDataset(train_chats, tokenizer, mask_prompt=True))
        tic = time.perf_counter()
        train(sft_model, optim.Adam(learning_rate=learning_rate_schedule(config)), dataset,
              args=TrainingArgs(batch_size=config.batch_size, iters=args.iters,
                                steps_per_report=args.iters, steps_per_save=10**9,
                                adapter_file=str(Path(tmp) / "sft.safetensors")))
        sft_seconds = time.perf_counter() - tic
        sft_model.eval()
        rows["sft (mlx-lm trainer)"] = heldout_metrics(sft_model, held_examples)

        kd_model, _, _ = distiller.load_student()
        tic = time.perf_counter()
        train_kd(kd_model, train_examples, config, adapter_config)
        kd_seconds = time.perf_counter() - tic
        rows["true kd (conch_dna)"] = heldout_metrics(kd_model, held_examples)

    print(f"\nteacher {args.teacher}\nstudent {args.student}")
    print(f"domains {args.domains}: {len(train_examples)} train traces, {len(held_examples)} held-out "
          f"traces ({rows['no training'].tokens} answer tokens); {args.iters} steps each, batch "
          f"{config.batch_size}, lr {args.learning_rate}, LoRA rank {args.lora_rank}, T {config.temperature}, "
          f"alpha {config.alpha}")
    print(f"{'':24s} {'held-out KL':>12s} {'CE':>8s} {'top-1':>7s}")
    for name, m in rows.items():
        print(f"{name:24s} {m.kl:12.4f} {m.ce:8.4f} {m.agreement:7.1%}")
    sft_kl, kd_kl = rows["sft (mlx-lm trainer)"].kl, rows["true kd (conch_dna)"].kl
    print(f"KD held-out KL is {100 * (1 - kd_kl / sft_kl):.1f}% below SFT's (goal: >= 20%)")
    print(f"training time: sft {sft_seconds:.1f}s, kd {kd_seconds:.1f}s")
    mx.clear_cache()


if __name__ == "__main__":
    main()

"""Step cost of true KD against mlx-lm's own LoRA SFT step, and teacher-cache bytes per token.

All steps run in one process on the same student, LoRA shape, batch and length:
  - KD with cached top-k targets: conch_dna's compiled training step (make_kd_step);
  - SFT: mlx-lm's default_loss (its trainer's loss) under the same compile pattern its trainer uses;
  - KD with an online teacher: a teacher forward pass inside every step, dense KL over the vocabulary.
Then the peak memory (mx.get_peak_memory) of one KD step against one SFT step on a student with a
Qwen2.5-sized vocabulary (--memory-vocab rows, random weights), where the loss dominates memory.
Then the packed teacher cache: its bytes per answer token against the raw form's, and what packing
costs: for each of --kl-seeds seeds, two fresh students train --kl-iters steps, one on the raw top-k
targets, one on the same targets packed and unpacked; all are measured on held-out chats against
the raw targets.

    python bench/kd_step.py                       # the tiny kit
    python bench/kd_step.py --teacher mlx-community/Qwen2.5-7B-Instruct-4bit \\
        --student mlx-community/Qwen2.5-3B-Instruct-4bit --length 512
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

from conch_dna.kit import corpus
from conch_dna.kit.seeds import DOMAIN_PROMPTS
from conch_dna.models.adapters import apply_lora
from conch_dna.models.chat import encode_chat, split_prompts, to_messages
from conch_dna.models.loading import load_model, output_vocab_size
from conch_dna.training.data import KDExample, collate
from conch_dna.training.evaluation import heldout_metrics
from conch_dna.training.losses import compute_kd_loss, masked_mean
from conch_dna.training.targets.teacher import TeacherCache, TeacherScorer, topk_logprobs
from conch_dna.training.targets.topk_codec import decode_topk, encode_topk
from conch_dna.training.true_kd import KDConfig, make_kd_step, train_kd

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.models import llama
from mlx_lm.tuner.trainer import default_loss
from pair_args import add_model_args, parse_model_args
from safetensors.numpy import save as safetensors_bytes


def interleaved_medians(variants: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each variant, their steps taken in turn so that a change in the
    machine's load (two cores, other processes) falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + repeats):
        for name, (step, state, batch) in variants.items():
            tic = time.perf_counter()
            mx.eval(state, step(*batch))
            if i >= warmup:
                times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def fresh_student(student_id: str, config: KDConfig, seed: int = 0):
    mx.random.seed(seed)
    model, tokenizer = load_model(student_id)
    apply_lora(model, config.lora_layers, config.lora_rank, config.lora_scale, config.lora_dropout)
    model.train()
    return model, tokenizer


def compiled(model, loss_fn):
    optimizer = optim.Adam(learning_rate=1e-5)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    def step(*batch):
        (value, _), grads = loss_and_grad(model, *batch)
        optimizer.update(model, grads)
        return value

    return mx.compile(step, inputs=state, outputs=state), state


def random_student(vocab: int):
    """A small llama body under a `vocab`-row embedding and output layer, LoRA on both blocks."""
    mx.random.seed(0)
    args = llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=192, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab, tie_word_embeddings=True))
    model = llama.Model(args)
    mx.eval(model.parameters())
    apply_lora(model, 2, 8, 20.0, 0.0)
    model.train()
    return model


def step_peak_mb(step, state, batch) -> float:
    """Peak MLX memory of one step beyond what was resident before it, in MB (after one warm-up)."""
    mx.eval(state, step(*batch))
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    resident = mx.get_active_memory()
    mx.eval(state, step(*batch))
    mx.synchronize()
    return (mx.get_peak_memory() - resident) / 2**20


def peak_memory(vocab: int, batch_size: int, length: int, k: int) -> tuple[float, float]:
    """(KD step peak, SFT step peak) in MB at a `vocab`-row vocabulary, batch_size x length tokens."""
    inputs = mx.random.randint(0, vocab, (batch_size, length))
    targets = mx.random.randint(0, vocab, (batch_size, length))
    ids = mx.random.randint(0, vocab, (batch_size, length, k)).astype(mx.int32)
    logprobs = mx.log(mx.softmax(mx.random.normal((batch_size, length, k)), axis=-1)) - 0.5
    mask = mx.ones((batch_size, length))
    full = mx.concatenate([inputs, targets[:, -1:]], axis=1)
    lengths = mx.array([[1, length]] * batch_size)
    config = KDConfig(top_k=k, lora_layers=2, lora_rank=8, hidden_weight=0.0)
    model = random_student(vocab)
    kd = step_peak_mb(*make_kd_step(model, optim.Adam(learning_rate=1e-5), config),
                      (inputs, targets, mask, ids, logprobs))
    del model
    sft_model = random_student(vocab)
    sft = step_peak_mb(*compiled(sft_model, default_loss), (full, lengths))
    return kd, sft


def raw_examples(teacher, tokenizer, chats, k: int, vocab_limit: int) -> list[KDExample]:
    """KD examples with the teacher's top-k as computed (float16 log-probs, the raw cache's form)."""
    examples = []
    for chat in chats:
        tokens, offset = encode_chat(tokenizer, chat)
        logits = teacher(mx.array(tokens[:-1])[None])[0, offset - 1 :]
        ids, logprobs = topk_logprobs(logits, k, vocab_limit)
        examples.append(KDExample(np.array(tokens, np.int32), offset, np.array(ids, np.int32),
                                  np.array(logprobs, np.float16)))
    return examples


def packed(example: KDExample) -> KDExample:
    ids, logprobs = decode_topk(encode_topk(example.topk_ids, example.topk_logprobs))
    return KDExample(example.tokens, example.offset, ids, logprobs)


def target_shift(raw: KDExample, packed_: KDExample) -> np.ndarray:
    """Per answer token, KL(raw targets ‖ packed targets) over the top-k (the same ids, matched) and the
    tail: how far packing moves what the student is trained toward, with no training noise in it."""
    def aligned(e: KDExample) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(e.topk_ids, axis=-1)
        p = np.exp(np.take_along_axis(e.topk_logprobs.astype(np.float64), order, axis=-1))
        tail = np.clip(1.0 - p.sum(-1, keepdims=True), 1e-12, None)
        return np.take_along_axis(e.topk_ids, order, axis=-1), np.concatenate([p, tail], axis=-1)
    (ids_r, p_r), (ids_p, p_p) = aligned(raw), aligned(packed_)
    assert (ids_r == ids_p).all(), "packing must keep the top-k ids exactly"
    p_r, p_p = np.clip(p_r, 1e-30, None), np.clip(p_p, 1e-30, None)
    return (p_r * (np.log(p_r) - np.log(p_p))).sum(-1)


def packing_cost(args, teacher) -> dict:
    """Bytes per answer token raw and packed, and the held-out KL (against raw targets) of students
    trained on raw targets against ones trained on packed targets, paired by seed (LoRA init, batch
    order): a one-seed pair says little, since a 1e-3 nudge to the targets moves a trained
    student's held-out KL by a few percent either way."""
    config = KDConfig(top_k=args.top_k, batch_size=args.batch_size, num_iters=args.kl_iters, hidden_weight=0.0,
                      learning_rate=args.kl_learning_rate, steps_per_report=args.kl_iters)
    model, tokenizer = fresh_student(args.student, config)
    vocab = output_vocab_size(model)
    del model
    if args.kl_domain:  # the domain's seed prompts, answered by the teacher (answers cached in --answers-cache)
        answers = TeacherScorer(args.teacher, TeacherCache(args.answers_cache or tempfile.mkdtemp()), args.top_k,
                                max_answer_tokens=args.kl_max_answer_tokens)
        prompts = split_prompts(DOMAIN_PROMPTS[args.kl_domain]["examples"][: args.kl_chats], 0.25)
        train_chats, held_chats = ([answers.complete(to_messages(args.kl_domain, p), tokenizer) for p in side]
                                   for side in prompts)
        answers.release()
    else:
        train_chats = corpus.dialogues(args.kl_chats, seed=11)
        held_chats = corpus.dialogues(args.kl_chats // 4, seed=12)
    train = raw_examples(teacher, tokenizer, train_chats, args.top_k, vocab)
    held = raw_examples(teacher, tokenizer, held_chats, args.top_k, vocab)
    tokens = sum(len(e.topk_ids) for e in train)
    raw_bytes = sum(len(safetensors_bytes({"ids": e.topk_ids, "logprobs": e.topk_logprobs})) for e in train)
    packed_bytes = sum(len(encode_topk(e.topk_ids, e.topk_logprobs)) for e in train)
    train_packed = [packed(e) for e in train]
    shift = float(np.concatenate([target_shift(r, q) for r, q in zip(train, train_packed)]).mean())
    untrained, _ = fresh_student(args.student, config)
    to_cover = heldout_metrics(untrained, train).kl
    del untrained
    kl: dict[str, list[float]] = {"raw": [], "packed": []}
    for seed in range(args.kl_seeds):
        for name, examples in (("raw", train), ("packed", train_packed)):
            student, _ = fresh_student(args.student, config, seed)
            train_kd(student, examples, replace(config, seed=seed), adapter_config={})
            kl[name].append(heldout_metrics(student, held).kl)
            del student
    change = [p / r - 1 for r, p in zip(kl["raw"], kl["packed"])]
    return {"raw_bytes": raw_bytes / tokens, "packed_bytes": packed_bytes / tokens, "tokens": tokens,
            "held_tokens": sum(len(e.topk_ids) for e in held), "kl": kl, "change": change,
            "shift": shift, "to_cover": to_cover}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, domains=None, prompts=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=128, help="tokens per sequence")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--memory-vocab", type=int, default=151936,
                   help="vocabulary rows of the peak-memory comparison (Qwen2.5-3B: 151936; 0 skips it)")
    p.add_argument("--memory-length", type=int, default=256, help="tokens per sequence there")
    p.add_argument("--kl-iters", type=int, default=60, help="steps of each student of the packing comparison")
    p.add_argument("--kl-chats", type=int, default=64, help="train chats there (a quarter as many held out)")
    p.add_argument("--kl-seeds", type=int, default=5, help="seeds of that comparison, each a raw and a packed run")
    p.add_argument("--kl-learning-rate", type=float, default=1e-3)
    p.add_argument("--kl-domain", help="train on this domain's seed prompts answered by the teacher (split 3:1) "
                                       "instead of the kit's dialogues; --kl-chats prompts")
    p.add_argument("--kl-max-answer-tokens", type=int, default=64, help="answer length there")
    p.add_argument("--answers-cache", help="a teacher cache holding those answers (e.g. /tmp/pair_cache)")
    p.add_argument("--packing-only", action="store_true", help="only the packed cache's figures")
    args = parse_model_args(p)
    if args.packing_only:
        print_packing(args, load_model(args.teacher)[0])
        return
    config = KDConfig(top_k=args.top_k, batch_size=args.batch_size, hidden_weight=0.0)  # the logit loss alone

    model, tokenizer = fresh_student(args.student, config)
    chats = corpus.dialogues(args.batch_size * 8, seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        cache = TeacherCache(tmp)
        scorer = TeacherScorer(args.teacher, cache, args.top_k, output_vocab_size(model))
        examples, answer_tokens = [], 0
        for chat in chats:
            tokens, offset = encode_chat(tokenizer, chat)
            ids, logprobs = scorer.targets(tokens, offset)
            examples.append(KDExample(np.array(tokens, np.int32), offset, ids, logprobs))
            answer_tokens += len(tokens) - offset
        cache_bytes = cache.size_bytes()
        teacher = scorer._load()[0]

    # One fixed batch of exactly --length tokens: every step variant sees the same shapes.
    batch = collate(examples[: args.batch_size], args.length, pad_to=args.length)
    inputs, targets, mask, ids, logprobs = batch
    kd_step, kd_state = make_kd_step(model, optim.Adam(learning_rate=1e-5), config)

    sft_model, _ = fresh_student(args.student, config)
    full = mx.concatenate([inputs, targets[:, -1:]], axis=1)
    offsets = (mx.argmax(mask, axis=1) + 1).astype(mx.int32)
    lengths = mx.stack([offsets, mask.sum(axis=1).astype(mx.int32) + offsets], axis=1)
    sft_step, sft_state = compiled(sft_model, default_loss)

    online_model, _ = fresh_student(args.student, config)

    def online_loss(m, inputs, targets, mask):
        logits = m(inputs)
        t_logits = mx.stop_gradient(teacher(inputs))
        kd = compute_kd_loss(t_logits, logits, config.temperature, mask)
        ce = masked_mean(nn.losses.cross_entropy(logits, targets), mask)
        return config.alpha * kd + (1 - config.alpha) * ce, kd

    online_step, online_state = compiled(online_model, online_loss)

    runs = interleaved_medians({
        "sft (mlx-lm default_loss)": (sft_step, sft_state, (full, lengths)),
        "kd, cached top-k": (kd_step, kd_state, batch),
        "kd, online teacher": (online_step, online_state, (inputs, targets, mask)),
    }, warmup=3, repeats=args.repeats)

    sft = runs["sft (mlx-lm default_loss)"]
    print(f"student {args.student}  teacher {args.teacher}")
    print(f"batch {args.batch_size} x {args.length} tokens, top-k {args.top_k}, "
          f"{args.repeats} timed steps each, taken in turn (median)")
    for name, seconds in runs.items():
        print(f"  {name:28s} {seconds * 1000:8.1f} ms/step   ratio to sft {seconds / sft:5.2f}")
    print(f"kd cached / sft ratio: {runs['kd, cached top-k'] / sft:.3f}  (target <= 1.10)")
    print(f"kd online / sft ratio: {runs['kd, online teacher'] / sft:.3f}")
    print(f"teacher cache: {cache_bytes} bytes for {answer_tokens} answer tokens = "
          f"{cache_bytes / answer_tokens:.1f} bytes/token at k={args.top_k} (target <= 150)")
    print_packing(args, teacher)
    if args.memory_vocab:
        kd_mb, sft_mb = peak_memory(args.memory_vocab, args.batch_size, args.memory_length, args.top_k)
        logits_mb = args.batch_size * args.memory_length * args.memory_vocab * 4 / 2**20
        print(f"peak memory at a {args.memory_vocab}-row vocabulary, batch {args.batch_size} x "
              f"{args.memory_length} (one float32 logits array: {logits_mb:.0f} MB): "
              f"kd {kd_mb:.0f} MB, sft {sft_mb:.0f} MB, kd/sft ratio {kd_mb / sft_mb:.2f} (target <= 1.10)")


def print_packing(args, teacher) -> None:
    cost = packing_cost(args, teacher)
    print(f"packed top-k over {cost['tokens']} answer tokens: {cost['packed_bytes']:.1f} bytes/token against "
          f"{cost['raw_bytes']:.1f} raw (ratio {cost['packed_bytes'] / cost['raw_bytes']:.3f})")
    print(f"packing moves the training targets by KL(raw || packed) {cost['shift']:.2e} nats per answer token, "
          f"{100 * cost['shift'] / cost['to_cover']:.4f}% of the untrained student's KL to them "
          f"({cost['to_cover']:.4f})")
    kl, change = cost["kl"], cost["change"]
    print(f"held-out KL ({cost['held_tokens']} tokens) after {args.kl_iters} steps, {args.kl_seeds} seeds: raw targets "
          f"{statistics.mean(kl['raw']):.4f} (seeds {min(kl['raw']):.4f}..{max(kl['raw']):.4f}), packed "
          f"{statistics.mean(kl['packed']):.4f}; packed against raw, seed by seed: mean "
          f"{100 * statistics.mean(change):+.2f}%, range {100 * min(change):+.2f}%..{100 * max(change):+.2f}% "
          "(target: the mean within 1%)")


if __name__ == "__main__":
    main()

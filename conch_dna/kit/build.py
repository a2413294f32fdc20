"""Builds the tiny model kit: a shared BPE tokenizer, a tiny teacher and a smaller student base.

Both models are mlx-lm `llama` models trained here, from scratch, on the synthetic corpus in
`corpus.py`; they are written in mlx-lm's format so `mlx_lm.load(path)` loads them exactly as it
loads an `mlx-community/...` model. The teacher is trained longer and is larger; the student base
sees fewer steps, so distillation has a real gap to close. The teacher's vocabulary is padded
past the tokenizer (as Qwen2.5-7B's 152064 is past 3B's 151936), so vocabulary alignment is
exercised by every run.

    python -m conch_dna.kit.build            # rebuilds conch_dna/kit/models/{teacher,student}
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from conch_dna.kit import corpus
from conch_dna.models.chat import render

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import save_config

KIT_DIR = Path(__file__).parent / "models"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, with tools as Qwen2.5 writes them: the schemas in the system turn, each call as
# <tool_call>{"name", "arguments"}</tool_call> (mlx-lm reads them with its json_tools parser), a
# result in a `tool` turn. A chat without tools renders exactly as plain ChatML.
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n{% endif %}"
    "<tools>\n{% for tool in tools %}{{ tool['function'] | tojson }}\n{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for tool_call in message['tool_calls'] or [] %}"
    "{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}</tool_call>'
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_VOCAB = 512
TOOL_DIALOGUES = 4800  # tool-use chats of `action` in the corpus, beside its 12000 text dialogues

TEACHER = dict(hidden_size=96, num_hidden_layers=3, intermediate_size=256,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=TOKENIZER_VOCAB + 64)
STUDENT = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=192,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=TOKENIZER_VOCAB)


def model_config(shape: dict) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
        "bos_token_id": None,
        "torch_dtype": "float32",
        **shape,
    }


def build_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def encode_dialogues(tokenizer, dialogues: list) -> list[list[int]]:
    """Token ids of chats: lists of messages, or tool-use chats ({"messages", "tools"}) rendered by
    conch's one rule (conch_dna.models.chat.render), as training and serving will render them."""
    return [render(tokenizer, d["messages"], d["tools"]) if isinstance(d, dict) else render(tokenizer, d)
            for d in dialogues]


def lm_loss(model, inputs, targets, mask):
    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits, targets) * mask
    return ce.sum() / mask.sum()


def batches(seqs: list[list[int]], batch_size: int, rng: np.random.Generator):
    while True:
        order = rng.permutation(len(seqs))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [seqs[j] for j in order[i : i + batch_size]]
            width = max(map(len, chunk))
            arr = np.zeros((batch_size, width), np.int32)
            mask = np.zeros((batch_size, width - 1), np.float32)
            for row, s in enumerate(chunk):
                arr[row, : len(s)] = s
                mask[row, : len(s) - 1] = 1.0
            yield mx.array(arr[:, :-1]), mx.array(arr[:, 1:]), mx.array(mask)


def train_lm(model, seqs, steps: int, lr: float, batch_size: int = 16, seed: int = 0) -> float:
    """Plain causal-LM training of every parameter; returns the last reported loss."""
    mx.random.seed(seed)
    schedule = optim.cosine_decay(lr, steps, end=lr * 0.05)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, lm_loss)
    state = [model.state, optimizer.state]

    def step(inputs, targets, mask):
        loss, grads = loss_and_grad(model, inputs, targets, mask)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    data = batches(seqs, batch_size, np.random.default_rng(seed))
    tic, running = time.perf_counter(), 0.0
    for it in range(1, steps + 1):
        loss = step(*next(data))
        mx.eval(state, loss)
        running += loss.item()
        if it % 50 == 0 or it == steps:
            n = 50 if it % 50 == 0 else it % 50
            print(f"  step {it}/{steps} loss {running / n:.3f} ({time.perf_counter() - tic:.0f}s)")
            last, running = running / n, 0.0
    return last


def answer_entropy(model, tokenizer, dialogues) -> float:
    """Mean next-token entropy (nats) of the model over the assistant-answer tokens."""
    total, count = 0.0, 0
    for d in dialogues:
        full = tokenizer.apply_chat_template(d, return_dict=False)
        offset = len(tokenizer.apply_chat_template(d[:-1], add_generation_prompt=True,
                                                   return_dict=False))
        logits = model(mx.array(full[:-1])[None])[0, offset - 1 :]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        ent = -(mx.exp(logp) * logp).sum(axis=-1)
        total += ent.sum().item()
        count += ent.shape[0]
    return total / count


def save_model_dir(model, shape: dict, tokenizer_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(model_config(shape), out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())


def build(out_dir: Path, teacher_steps: int, student_steps: int) -> dict:
    from transformers import PreTrainedTokenizerFast

    train_dialogues = corpus.dialogues(12000, seed=1) + corpus.tool_dialogues(TOOL_DIALOGUES, seed=1)
    eval_dialogues = corpus.dialogues(300, seed=2)
    texts = [m["content"] for d in train_dialogues[:3000] for m in d]
    tool_texts = [json.dumps([t["function"] for t in d["tools"]]) + json.dumps(d["messages"])
                  for d in train_dialogues[-TOOL_DIALOGUES // 4:]]
    tok_dir = out_dir / "_tokenizer"
    build_tokenizer(texts + tool_texts, tok_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    seqs = encode_dialogues(tokenizer, train_dialogues)
    print(f"corpus: {len(seqs)} dialogues, {sum(map(len, seqs))} tokens, vocab {len(tokenizer)}")

    report = {"tokenizer_vocab": len(tokenizer), "log_vocab": math.log(len(tokenizer))}
    for name, shape, steps, lr in (
        ("teacher", TEACHER, teacher_steps, 3e-3),
        ("student", STUDENT, student_steps, 3e-3),
    ):
        mx.random.seed(7)
        model = llama.Model(llama.ModelArgs.from_dict(model_config(shape)))
        n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
        print(f"training {name}: {n_params} parameters, {steps} steps")
        train_lm(model, seqs, steps, lr)
        entropy = answer_entropy(model, tokenizer, eval_dialogues)
        print(f"  {name} mean next-token entropy on answers: {entropy:.3f} nats "
              f"(log vocab = {report['log_vocab']:.3f})")
        save_model_dir(model, shape, tok_dir, out_dir / name)
        report[name] = {"parameters": n_params, "steps": steps, "answer_entropy": entropy}
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    (out_dir / "kit_report.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=KIT_DIR)
    parser.add_argument("--teacher-steps", type=int, default=1400)
    parser.add_argument("--student-steps", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(build(args.out, args.teacher_steps, args.student_steps), indent=2))


if __name__ == "__main__":
    main()

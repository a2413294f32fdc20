"""TRUE knowledge distillation of a student's LoRA adapter from a teacher's token distributions.

    python -m conch_dna.training.true_kd --domain thinking --iters 200
    python -m conch_dna.training.true_kd --all --kit          # the project's tiny models

The loss on every answer token is α·KD·T² + (1-α)·CE, where KD compares the student with the
teacher's cached top-k log-probs (plus the tail mass) and CE is on the teacher's own tokens.
The teacher runs only to write targets (cached on disk) and is released before the student trains.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from conch_dna.adapters import (
    adapter_weights,
    apply_lora,
    load_adapter_weights,
    load_optimizer_state,
    save_adapter,
    save_checkpoint,
)
from conch_dna.domains import DOMAINS, is_heldout, validate_domain_name
from conch_dna.evaluation import heldout_metrics
from conch_dna.fsutil import atomic_write_json
from conch_dna.home import conch_home
from conch_dna.models import (
    ModelLoadError,
    check_model_ref,
    load_model,
    load_tokenizer_only,
    output_vocab_size,
    tokenizer_fingerprint,
)
from conch_dna.teacher import TeacherCache, TeacherScorer
from conch_dna.training.data import KDExample, iterate_kd_batches
from conch_dna.training.losses import (  # noqa: F401 - the documented public API
    DIVERGENCES,
    align_vocab_sizes,
    check_shared_vocab,
    compute_ce_loss,
    compute_kd_loss,
    log_softmax,
    masked_mean,
    sparse_kd_from_topk,
    sparse_kd_loss,
    student_logprobs_at,
)

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

DEFAULT_TEACHER = "mlx-community/Qwen2.5-7B-Instruct-4bit"
DEFAULT_STUDENT = "mlx-community/Qwen2.5-3B-Instruct-4bit"


def _range(lo, hi, lo_open=False):
    return {"range": (lo, hi, lo_open)}


@dataclass
class KDConfig:
    """Settings of one distillation run. Out-of-range values fail here, naming field and range."""

    temperature: float = field(default=2.0, metadata=_range(0.5, 10.0))
    alpha: float = field(default=0.7, metadata=_range(0.0, 1.0))
    lora_rank: int = field(default=16, metadata=_range(4, 64))
    lora_scale: float = field(default=20.0, metadata=_range(0.0, 100.0, lo_open=True))
    lora_dropout: float = field(default=0.0, metadata=_range(0.0, 0.9))
    lora_layers: int = field(default=16, metadata=_range(1, 1024))
    learning_rate: float = field(default=1e-4, metadata=_range(1e-6, 1e-2))
    batch_size: int = field(default=4, metadata=_range(1, 256))
    num_iters: int = field(default=200, metadata=_range(1, 1_000_000))
    steps_per_report: int = field(default=10, metadata=_range(1, 1_000_000))
    steps_per_save: int = field(default=100, metadata=_range(1, 1_000_000))
    top_k: int = field(default=64, metadata=_range(1, 1024))
    max_seq_length: int = field(default=2048, metadata=_range(16, 1_048_576))
    max_answer_tokens: int = field(default=256, metadata=_range(1, 32768))
    divergence: str = "forward_kl"
    jsd_beta: float = field(default=0.5, metadata=_range(0.0, 1.0, lo_open=True))
    seed: int = 0

    def __post_init__(self):
        for f in fields(self):
            if "range" not in f.metadata:
                continue
            lo, hi, lo_open = f.metadata["range"]
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"KDConfig.{f.name} must be a number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ValueError(f"KDConfig.{f.name} must be an integer, got {value!r}")
            below = value <= lo if lo_open else value < lo
            if below or value > hi or (isinstance(value, float) and math.isnan(value)):
                bracket = "(" if lo_open else "["
                raise ValueError(f"KDConfig.{f.name} must be in {bracket}{lo}, {hi}], got {value}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"KDConfig.divergence must be one of {', '.join(DIVERGENCES)}, "
                f"got {self.divergence!r}"
            )


@dataclass
class DistillResult:
    domain: str
    final_kd_loss: float
    final_ce_loss: float
    final_combined_loss: float
    training_time_seconds: float
    adapter_path: str
    history: list[dict]
    num_examples: int
    teacher_forward_passes: int
    heldout_before: dict | None = None
    heldout_after: dict | None = None
    heldout_groups: dict | None = None  # {name: {"before": metrics, "after": metrics}} for subsets

    def as_dict(self) -> dict:
        return asdict(self)


def get_kd_adapter_path(domain: str, output_dir: str | Path | None = None) -> Path:
    """The adapter directory of a domain: the current promoted version when the domain has a
    manifest (the daemon's layout), else <output-dir>/adapters_kd/<domain> (the plain trainer's)."""
    from conch_dna.versions import current_adapter_path

    home = Path(output_dir or conch_home())
    return current_adapter_path(home, domain) or home / "adapters_kd" / validate_domain_name(domain)


def kd_loss(model, inputs, targets, mask, topk_ids, topk_logprobs, *, temperature, alpha,
            kind="forward_kl", beta=0.5):
    """α·KD·T² + (1-α)·CE over the answer tokens; returns (combined, kd, ce)."""
    student_topk, target_logp = student_logprobs_at(model(inputs), topk_ids, targets)
    kd = sparse_kd_from_topk(student_topk, topk_logprobs, temperature, mask, kind, beta)
    ce = masked_mean(-target_logp, mask)
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


def make_kd_step(model, optimizer, config: KDConfig):
    """The compiled training step: one batch in, LoRA updated, (combined, kd, ce) out."""
    loss_and_grad = nn.value_and_grad(
        model, lambda m, *batch: kd_loss(m, *batch, temperature=config.temperature,
                                         alpha=config.alpha, kind=config.divergence,
                                         beta=config.jsd_beta))
    state = [model.state, optimizer.state, mx.random.state]

    # Token counts stay outside: mx.compile rejects an output that depends on inputs alone.
    def step(*batch):
        (combined, kd, ce), grads = loss_and_grad(model, *batch)
        optimizer.update(model, grads)
        return combined, kd, ce

    return mx.compile(step, inputs=state, outputs=state), state


def learning_rate_schedule(config: KDConfig):
    """Linear warmup over the first 10% of steps, then cosine decay to 10% of the peak.

    LoRA starts at zero; without a warmup the first Adam steps overshoot at the scales mlx-lm uses.
    """
    warmup = max(1, config.num_iters // 10)
    peak = config.learning_rate
    decay = optim.cosine_decay(peak, max(1, config.num_iters - warmup), end=0.1 * peak)
    return optim.join_schedules([optim.linear_schedule(0.1 * peak, peak, warmup), decay], [warmup])


class TrainingInterrupted(Exception):
    """should_stop() said stop: the adapter so far was saved to `checkpoint` at `iteration`."""

    def __init__(self, iteration: int, checkpoint: Path | None):
        super().__init__(f"training interrupted at step {iteration}")
        self.iteration, self.checkpoint = iteration, checkpoint


def train_kd(model, examples: list[KDExample], config: KDConfig, adapter_config: dict,
             checkpoint_dir: Path | None = None, on_report=None, should_stop=None,
             resume: tuple[str | Path, int] | None = None) -> list[dict]:
    """The training loop: LoRA parameters of `model` learn the teacher targets of `examples`.

    Every steps_per_report a report dict (iteration, kd, ce, combined, tokens/s) goes to the
    history and to on_report; every steps_per_save a checkpoint goes to checkpoint_<N>/.
    When should_stop() turns true, a checkpoint is saved and TrainingInterrupted is raised.
    `resume` = (checkpoint dir, its step), with the checkpoint's weights already in `model`: the
    optimizer state, learning-rate schedule and batch order go on from there, so a resumed run
    ends where an uninterrupted one would (without LoRA dropout, whose masks differ).
    """
    mx.random.seed(config.seed)
    optimizer = optim.Adam(learning_rate=learning_rate_schedule(config))
    start = resume[1] if resume else 0
    if resume and not load_optimizer_state(optimizer, model, resume[0]):
        optimizer.state["step"] = mx.array(start, dtype=mx.uint64)  # at least the schedule goes on
    step, state = make_kd_step(model, optimizer, config)
    batches = iterate_kd_batches(examples, config.batch_size, config.max_seq_length, config.seed, skip=start)

    model.train()
    history: list[dict] = []
    sums, n_steps, n_tokens, tic = [0.0, 0.0, 0.0], 0, 0, time.perf_counter()
    for it in range(start + 1, config.num_iters + 1):
        batch = next(batches)
        combined, kd, ce = step(*batch)
        mx.eval(state, combined, kd, ce)
        sums = [s + v.item() for s, v in zip(sums, (combined, kd, ce))]
        n_steps, n_tokens = n_steps + 1, n_tokens + int(batch[2].sum().item())
        if it % config.steps_per_report == 0 or it == config.num_iters:
            elapsed = time.perf_counter() - tic
            report = {"iteration": it, "combined": sums[0] / n_steps, "kd": sums[1] / n_steps,
                      "ce": sums[2] / n_steps, "tokens_per_second": n_tokens / elapsed}
            history.append(report)
            if on_report:
                on_report(report)
            sums, n_steps, n_tokens, tic = [0.0, 0.0, 0.0], 0, 0, time.perf_counter()
        if checkpoint_dir and it % config.steps_per_save == 0 and it != config.num_iters:
            save_checkpoint(checkpoint_dir / f"checkpoint_{it}", model, optimizer, adapter_config)
        if should_stop and should_stop() and it != config.num_iters:
            path = checkpoint_dir / f"checkpoint_{it}" if checkpoint_dir else None
            if path:
                save_checkpoint(path, model, optimizer, adapter_config)
            model.eval()
            raise TrainingInterrupted(it, path)
    model.eval()
    return history


def to_messages(domain: str, prompt) -> list[dict]:
    """A prompt as chat messages: a string gets the domain's system prompt; chats pass through."""
    from conch_dna.training.distillation import DOMAIN_PROMPTS

    if isinstance(prompt, str):
        system = DOMAIN_PROMPTS.get(domain, {}).get("system")
        head = [{"role": "system", "content": system}] if system else []
        return [*head, {"role": "user", "content": prompt}]
    if isinstance(prompt, dict) and "messages" in prompt:
        return list(prompt["messages"])
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return list(prompt)
    raise ValueError(f"a prompt must be a string, a list of chat messages or a trace, "
                     f"got {type(prompt).__name__}")


def prompt_text(messages: list[dict]) -> str:
    """The text a held-out split is decided on: every message before the answer."""
    body = messages[:-1] if messages[-1].get("role") == "assistant" else messages
    return "\n".join(f"{m['role']}: {m['content']}" for m in body)


class TrueKnowledgeDistiller:
    """Distils a teacher into per-domain LoRA adapters of a student base."""

    def __init__(self, teacher_model_id: str = DEFAULT_TEACHER,
                 student_model_id: str = DEFAULT_STUDENT, config: KDConfig | None = None,
                 output_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 console=None):
        check_model_ref(teacher_model_id)
        check_model_ref(student_model_id)
        self.teacher_model_id = teacher_model_id
        self.student_model_id = student_model_id
        self.config = config or KDConfig()
        self.output_dir = Path(output_dir or conch_home())
        cache = TeacherCache(cache_dir or self.output_dir / "teacher_cache")
        self.scorer = TeacherScorer(teacher_model_id, cache, self.config.top_k,
                                    max_answer_tokens=self.config.max_answer_tokens)
        self.console = console
        self._vocab_checked = False

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    def load_student(self, adapter_path: str | Path | None = None):
        model, tokenizer = load_model(self.student_model_id)
        mx.random.seed(self.config.seed)  # LoRA's initial lora_a is random: same seed, same run
        adapter_config = apply_lora(model, self.config.lora_layers, self.config.lora_rank,
                                    self.config.lora_scale, self.config.lora_dropout)
        if adapter_path and not load_adapter_weights(model, adapter_path):
            self._say(f"[yellow]adapter at {adapter_path} does not fit this LoRA shape; "
                      "starting from the bare student[/yellow]")
        return model, tokenizer, adapter_config

    def teacher_examples(self, domain: str, prompts, tokenizer, should_stop=None) -> list[KDExample]:
        """KD examples for prompts: teacher answers where missing, then cached top-k targets."""
        if not self._vocab_checked:
            check_shared_vocab(load_tokenizer_only(self.teacher_model_id), tokenizer)
            self._vocab_checked = True
        fingerprint = tokenizer_fingerprint(tokenizer)
        examples = []
        for p in prompts:
            if should_stop and should_stop():
                raise TrainingInterrupted(0, None)
            examples.append(self.scorer.example(to_messages(domain, p), tokenizer,
                                                p.get("topk") if isinstance(p, dict) else None, fingerprint))
        return examples

    def distill_domain(self, domain: str, prompts, heldout=None,
                       warm_start: str | Path | None = None, on_report=None,
                       adapter_dir: str | Path | None = None, should_stop=None,
                       resume: tuple[str | Path, int] | None = None,
                       heldout_groups: dict[str, list] | None = None) -> DistillResult:
        """Train the domain's adapter on `prompts`; evaluate on `heldout` before and after.

        Prompts are strings, chat message lists (answered if the last message is not the
        assistant's) or traces ({"messages": ...}). The adapter is written to
        get_kd_adapter_path(domain, output_dir) (or adapter_dir), with checkpoints inside it.
        `resume` = (checkpoint dir, its step) continues an interrupted run: "before" metrics are
        still those of warm_start, training goes on from the checkpoint's weights and step.
        `heldout_groups` are named subsets evaluated before and after as well.
        """
        validate_domain_name(domain)
        if not prompts:
            raise ValueError(f"no prompts to distil for domain {domain!r}")
        model, tokenizer, adapter_config = self.load_student(warm_start)
        self.scorer.vocab_limit = output_vocab_size(model)
        self._say(f"[bold]{domain}[/bold]: teacher targets for {len(prompts)} prompts"
                  + (f" + {len(heldout)} held-out" if heldout else ""))
        passes_before = self.scorer.forward_passes
        train = self.teacher_examples(domain, prompts, tokenizer, should_stop)
        held = self.teacher_examples(domain, heldout, tokenizer, should_stop) if heldout else []
        self.scorer.release()  # teacher and student are never resident together while training

        def evaluate(m, examples):  # in the same window as training
            return heldout_metrics(m, examples, max_seq_length=self.config.max_seq_length)

        before = evaluate(model, held) if held else None
        groups = {name: self.teacher_examples(domain, items, tokenizer, should_stop)
                  for name, items in (heldout_groups or {}).items() if items}
        group_before = {name: evaluate(model, ex) for name, ex in groups.items()}
        if resume and load_adapter_weights(model, resume[0]):
            self._say(f"{domain}: resuming from {resume[0]} at step {resume[1]}")
        else:
            resume = None
        out = Path(adapter_dir or self.output_dir / "adapters_kd" / domain)
        adapter_config = {
            "model": self.student_model_id,
            **adapter_config,
            "kd": {**asdict(self.config), "teacher": self.teacher_model_id, "domain": domain},
        }
        tic = time.perf_counter()
        history = self._train_with_progress(model, train, adapter_config, out, domain, on_report,
                                            should_stop, resume)
        elapsed = time.perf_counter() - tic
        after = evaluate(model, held) if held else None
        group_metrics = {name: {"before": group_before[name].as_dict(), "after": evaluate(model, ex).as_dict()}
                         for name, ex in groups.items()}
        save_adapter(out, adapter_weights(model), adapter_config)
        last = history[-1]
        result = DistillResult(
            domain=domain, final_kd_loss=last["kd"], final_ce_loss=last["ce"],
            final_combined_loss=last["combined"], training_time_seconds=elapsed,
            adapter_path=str(out), history=history, num_examples=len(train),
            teacher_forward_passes=self.scorer.forward_passes - passes_before,
            heldout_before=before.as_dict() if before else None,
            heldout_after=after.as_dict() if after else None,
            heldout_groups=group_metrics or None,
        )
        atomic_write_json(out / "kd_metrics.json", result.as_dict())
        self._say(f"{domain}: held-out before  {_fmt(before and before.as_dict())}")
        self._say(f"{domain}: held-out after   {_fmt(after and after.as_dict())}")
        self._say(f"{domain}: adapter {out} ({elapsed:.1f}s, {len(train)} examples, "
                  f"{result.teacher_forward_passes} teacher passes)")
        return result

    def _train_with_progress(self, model, examples, adapter_config, out, domain, on_report,
                             should_stop=None, resume=None):
        if self.console is None:
            return train_kd(model, examples, self.config, adapter_config, out, on_report, should_stop,
                            resume)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(f"{domain} KD", total=self.config.num_iters)

            def report(r):
                bar.update(task, completed=r["iteration"],
                           description=f"{domain} KD loss {r['combined']:.3f} "
                                       f"(kd {r['kd']:.3f} ce {r['ce']:.3f})")
                if on_report:
                    on_report(r)

            return train_kd(model, examples, self.config, adapter_config, out, report, should_stop,
                            resume)

    def distill_all(self, domains=None, heldout_fraction: float = 0.1) -> list[DistillResult]:
        """Distil every domain from DOMAIN_PROMPTS; writes <output-dir>/adapters_kd/kd_summary.json."""
        from conch_dna.training.distillation import DOMAIN_PROMPTS

        results = []
        for domain in domains or DOMAINS:
            train, held = split_prompts(DOMAIN_PROMPTS[domain]["examples"], heldout_fraction)
            results.append(self.distill_domain(domain, train, held))
        atomic_write_json(self.output_dir / "adapters_kd" / "kd_summary.json",
                          [r.as_dict() for r in results])
        return results


def split_prompts(prompts: list, fraction: float) -> tuple[list, list]:
    """(train, held-out) by the hash of each prompt's text: the split the trace store uses too."""
    train, held = [], []
    for p in prompts:
        text = p if isinstance(p, str) else prompt_text(to_messages("", p))
        (held if is_heldout(text, fraction) else train).append(p)
    return train, held


def _fmt(metrics: dict | None) -> str:
    if not metrics:
        return "n/a"
    return f"KL {metrics['kl']:.4f}  CE {metrics['ce']:.4f}  top-1 {metrics['agreement']:.1%}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conch_dna.training.true_kd",
                                description="TRUE knowledge distillation into LoRA adapters.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--domain", help=f"one domain ({', '.join(DOMAINS)})")
    which.add_argument("--all", action="store_true", help="every domain")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher model id or path")
    p.add_argument("--student", default=DEFAULT_STUDENT, help="student base model id or path")
    which_pair = p.add_mutually_exclusive_group()
    which_pair.add_argument("--kit", action="store_true",
                            help="use the project's tiny teacher and student (overrides --teacher/--student)")
    which_pair.add_argument("--real", action="store_true",
                            help="use SmolLM2-135M-Instruct and its 15-layer cut (`conch models pair`; built "
                                 "under $CONCH_HOME/models/smollm2 on first use)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where adapters_kd/ and teacher_cache/ go (default: $CONCH_HOME)")
    return p


def main(argv: list[str] | None = None) -> int:
    from conch_dna.domains import UnknownDomainError, check_domain
    from conch_dna.realpair import PairBuildError
    from conch_dna.training.distillation import DOMAIN_PROMPTS

    from rich.console import Console

    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        if args.kit:
            from conch_dna.kit import STUDENT_PATH, TEACHER_PATH

            args.teacher, args.student = TEACHER_PATH, STUDENT_PATH
        if args.real:
            from conch_dna.realpair import build_pair

            args.teacher, args.student = (str(p) for p in build_pair(conch_home() / "models" / "smollm2"))
        if not 0.0 <= args.heldout_fraction < 1.0:
            raise ValueError(f"--heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
        config = KDConfig(temperature=args.temperature, alpha=args.alpha,
                          lora_rank=args.lora_rank, num_iters=args.iters,
                          learning_rate=args.learning_rate, batch_size=args.batch_size,
                          top_k=args.top_k)
        distiller = TrueKnowledgeDistiller(args.teacher, args.student, config, args.output_dir,
                                           console=console)
        if args.all:
            distiller.distill_all(heldout_fraction=args.heldout_fraction)
            console.print(f"summary: {distiller.output_dir / 'adapters_kd' / 'kd_summary.json'}")
        else:
            domain = check_domain(args.domain)
            train, held = split_prompts(DOMAIN_PROMPTS[domain]["examples"],
                                        args.heldout_fraction)
            distiller.distill_domain(domain, train, held)
    except (ValueError, UnknownDomainError, ModelLoadError, PairBuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

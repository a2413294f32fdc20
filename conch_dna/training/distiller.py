"""The distiller: a domain's run put together: the teacher's targets (cached, or the student's own answers
scored), the held-out metrics before and after, the training loop, the adapter and its metrics written."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from conch_dna.models.adapters import (
    KD_METRICS_FILE,
    apply_lora,
    load_adapter_weights,
    save_inference_adapter,
)
from conch_dna.models.chat import prompt_tokens, split_prompts, to_chat
from conch_dna.models.loading import (
    DEFAULT_STUDENT,
    DEFAULT_TEACHER,
    check_model_ref,
    check_shared_vocab,
    free_memory,
    load_model,
    load_tokenizer_only,
    model_dims,
    output_vocab_size,
    tokenizer_fingerprint,
)
from conch_dna.models.realpair import student_origin
from conch_dna.models.structured import Grammars, held_to
from conch_dna.models.versions import current_adapter_path
from conch_dna.system import distributed
from conch_dna.system.domains import DOMAINS, validate_domain_name
from conch_dna.system.fsutil import atomic_write_json
from conch_dna.system.home import ADAPTERS_DIR, TEACHER_CACHE_DIR, conch_home
from conch_dna.training.callbacks import KDCallback
from conch_dna.training.data import KDExample
from conch_dna.training.evaluation import (
    answer_checks,
    answer_scores,
    answers_format,
    answers_tool_call,
    format_metrics,
    heldout_metrics,
    tool_call_metrics,
)
from conch_dna.training.hidden import attach_projection, layer_map
from conch_dna.training.kd_config import KDConfig
from conch_dna.training.loop import TrainingInterrupted, train_kd
from conch_dna.training.on_policy import answer_tokens, pick_on_policy, round_boundaries, round_groups
from conch_dna.training.targets.mixture import TeacherMixture
from conch_dna.training.targets.teacher import TeacherCache, TeacherScorer

import mlx.core as mx
import numpy as np


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
    samples_generated: int = 0  # train prompts the student answered itself (on-policy)
    # teacher passes over the student's own answers (train samples, both versions' held-out answers);
    # teacher_forward_passes counts those over traces
    own_answer_passes: int = 0
    phase_seconds: dict | None = None  # seconds of each phase: sample, teacher, train, evaluate

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DistillOptions:
    """How one distill_domain run starts and where it writes; the defaults train a fresh adapter."""

    warm_start: str | Path | None = None  # an adapter directory to start from
    adapter_dir: str | Path | None = None  # default: <output-dir>/adapters_kd/<domain>
    resume: tuple[str | Path, int] | None = None  # (checkpoint dir, its step) of an interrupted run
    heldout_groups: dict[str, list] | None = None  # named held-out subsets measured before and after
    # the on-policy held-out KL: the teacher scores each version's own answers, so False is how a
    # machine without the teacher (its targets imported, `conch teacher-cache import`) trains
    measure_on_policy: bool = True


def get_kd_adapter_path(domain: str, output_dir: str | Path | None = None) -> Path:
    """The adapter directory of a domain: the current promoted version when the domain has a
    manifest (the daemon's layout), else <output-dir>/adapters_kd/<domain> (the plain trainer's)."""
    home = Path(output_dir or conch_home())
    return current_adapter_path(home, domain) or home / ADAPTERS_DIR / validate_domain_name(domain)


def _words(metrics: dict | None) -> str:
    if not metrics:
        return "n/a"
    own = metrics.get("on_policy")
    return (f"KL {metrics['kl']:.4f}  CE {metrics['ce']:.4f}  top-1 {metrics['agreement']:.1%}"
            + (f"  on-policy KL {own['kl']:.4f}" if own else ""))


class PhaseClock:
    """Seconds spent in each named phase of a run (sample, teacher, train, evaluate)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - tic


class TrueKnowledgeDistiller:
    """Distils a teacher into per-domain LoRA adapters of a student base.

    `teacher_model_id` / `student_model_id`: hub ids or local mlx-lm directories sharing one
    vocabulary. Adapters go to <output_dir>/adapters_kd/<domain> (default $CONCH_HOME), teacher
    targets to `cache_dir` (default <output_dir>/teacher_cache). `callbacks` hears about progress
    and may stop a run. With config.teachers, those teachers' targets are mixed (see
    conch_dna.training.targets.mixture) and `teacher_model_id` is not used. Raises ModelLoadError for a model
    path that does not exist.
    """

    def __init__(self, teacher_model_id: str = DEFAULT_TEACHER,
                 student_model_id: str = DEFAULT_STUDENT, config: KDConfig | None = None,
                 output_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 callbacks: KDCallback | None = None):
        self.config = config or KDConfig()
        mixed = self.config.teachers or [{"model": teacher_model_id, "weight": 1.0}]
        for ref in [t["model"] for t in mixed] + [student_model_id]:
            check_model_ref(ref)
        self.teacher_model_id = mixed[0]["model"]
        self.student_model_id = student_model_id
        self.output_dir = Path(output_dir or conch_home())
        cache = TeacherCache(cache_dir or self.output_dir / TEACHER_CACHE_DIR)
        self.teachers = TeacherMixture(
            [TeacherScorer(t["model"], cache, self.config.top_k, max_answer_tokens=self.config.max_answer_tokens,
                           max_seq_length=self.config.max_seq_length) for t in mixed],
            [t["weight"] for t in mixed], self.config.top_k)
        self.hidden_widths = None  # (student, teacher) widths when the hidden-state loss is on
        if self.config.hidden_weight > 0:
            (s_depth, s_width), (t_depth, t_width) = model_dims(student_model_id), model_dims(self.teacher_model_id)
            origin = student_origin(student_model_id) if self.config.hidden_layer_map == "origin" else None
            pairs = layer_map(self.config.hidden_layers, s_depth, t_depth, origin)
            self.teachers.scorers[0].hidden_layers = [t for _, t in pairs]
            self.hidden_widths = (s_width, t_width)
        self.callbacks = callbacks or KDCallback()
        self.own_answer_passes = 0  # of all runs so far, like teachers.forward_passes
        self._vocab_checked = False

    def load_student(self, adapter_path: str | Path | None = None):
        """(model with LoRA, tokenizer, adapter config); LoRA starts from `adapter_path` if it fits."""
        model, tokenizer = load_model(self.student_model_id)
        mx.random.seed(self.config.seed)  # LoRA's initial lora_a is random: same seed, same run
        adapter_config = apply_lora(model, self.config.lora_layers, self.config.lora_rank,
                                    self.config.lora_scale, self.config.lora_dropout)
        if self.hidden_widths:
            attach_projection(model, *self.hidden_widths)
        # data-parallel: rank 0 reads the adapter (its home holds the versions) and every rank gets its weights
        if adapter_path and distributed.is_leader() and not load_adapter_weights(model, adapter_path):
            self.callbacks.on_stage("", f"adapter at {adapter_path} does not fit this LoRA shape; "
                                        "starting from the bare student")
        if distributed.size() > 1:
            model.update(distributed.broadcast_tree(model.trainable_parameters(), "rank 0's adapter"))
        return model, tokenizer, adapter_config

    def teacher_examples(self, domain: str, prompts, tokenizer) -> list[KDExample]:
        """KD examples for prompts: teacher answers where missing, then cached top-k targets.

        Raises VocabMismatchError when teacher and student do not share token ids, and
        TrainingInterrupted(0) when callbacks.should_stop() turns true between prompts.
        """
        if not self._vocab_checked:
            for scorer in self.teachers.scorers:
                check_shared_vocab(load_tokenizer_only(scorer.teacher_model_id), tokenizer)
            self._vocab_checked = True
        chats = [(to_chat(domain, p), p.get("topk") if isinstance(p, dict) else None) for p in prompts]
        # data-parallel: each rank scores its share of the chats, then every rank has every example
        mine = self.teachers.examples(distributed.shard(chats), tokenizer, tokenizer_fingerprint(tokenizer),
                                      self._check_stop)
        return distributed.gather(mine, _encode_examples, _decode_examples, "the teacher targets")

    def _check_stop(self) -> None:
        if self.callbacks.should_stop():
            raise TrainingInterrupted(0, None)

    def distill_domain(self, domain: str, prompts, heldout=None,
                       options: DistillOptions | None = None) -> DistillResult:
        """Train the domain's adapter on `prompts`; evaluate on `heldout` before and after.

        Prompts are strings, chat message lists (answered if the last message is not the
        assistant's) or traces ({"messages": ..., "tools": ..., "topk": ...}). The adapter is written to
        get_kd_adapter_path(domain, output_dir) (or options.adapter_dir), with checkpoints inside it,
        and kd_metrics.json next to it. With options.resume the "before" metrics are still those of
        options.warm_start; training goes on from the checkpoint's weights and step.

        A run goes in phases with one model resident at a time: the current student answers a
        share (config.on_policy) of the train prompts and every held-out prompt ("sample"); the
        teacher scores all of it ("teacher"); the student trains on the mix ("train"; with
        config.on_policy_rounds > 1 the on-policy prompts are shared out over rounds, each answered
        by the training student as it stands when its round starts, see _train); the candidate
        answers the held-out prompts, the teacher scores those answers and the candidate is measured
        on them ("evaluate"). Held-out metrics hold the teacher-forced ones and, under "on_policy",
        those over the version's own answers.
        Raises ValueError for no prompts, TrainingInterrupted when stopped (see train_kd).
        """
        validate_domain_name(domain)
        if not prompts:
            raise ValueError(f"no prompts to distil for domain {domain!r}")
        options = options or DistillOptions()
        clock = PhaseClock()
        held_sets = {name: items for name, items in {"": heldout or [], **(options.heldout_groups or {})}.items()
                     if items}
        picked = pick_on_policy(len(prompts), self.config.on_policy, self.config.seed)
        chats = [[to_chat(domain, prompts[i]) for i in group]
                 for group in round_groups(picked, self.config.on_policy_rounds)]
        passes_before, own_before = self.teachers.forward_passes, self.own_answer_passes
        tool_held = [p for p in heldout or [] if answers_tool_call(p)]
        form_held = [p for p in heldout or [] if answers_format(p)]
        with clock("sample"):
            tokenizer, sampled, held_own, tool_own, form_own = self._answers(
                domain, options.warm_start, chats[0], held_sets if options.measure_on_policy else {}, tool_held,
                form_held)
        with clock("teacher"):
            kept = [p for i, p in enumerate(prompts) if i not in frozenset(picked)]
            train, held, own = self._targets(domain, tokenizer, kept, sampled, held_sets, held_own)
        out = Path(options.adapter_dir or self.output_dir / ADAPTERS_DIR / domain)
        history, elapsed, before, after = self._train(domain, tokenizer, train, chats[1:], held, own, out,
                                                      options, clock)
        if "" in held_own and "" in before:
            before[""]["answers"] = _answer_report(tokenizer, held_own[""], before[""], held[""],
                                                  self.config.sample_max_tokens)
        if options.measure_on_policy or tool_held or form_held:
            with clock("evaluate"):
                measured, tool_after, own_after, form_after = self._measure_own(
                    domain, out, held_sets if options.measure_on_policy else {}, tool_held, form_held)
                for name, metrics in measured.items():
                    if (scores := metrics.pop("answer_scores", None)) is not None:
                        after[name]["answer_scores"] = scores
                    after[name]["on_policy"] = metrics
                if "" in own_after and "" in after:
                    after[""]["answers"] = _answer_report(tokenizer, own_after[""], after[""], held[""],
                                                         self.config.sample_max_tokens)
        if tool_held:
            before[""]["tool_calls"] = tool_call_metrics(tokenizer, tool_held, tool_own)
            after[""]["tool_calls"] = tool_call_metrics(tokenizer, tool_held, tool_after)
        if form_held:
            before[""]["formats"] = format_metrics(tokenizer, form_held, *form_own)
            after[""]["formats"] = format_metrics(tokenizer, form_held, *form_after)
        # every rank's passes: with a data-parallel run each trace was scored by one of them
        all_passes, own_passes = (int(x) for x in distributed.all_sum(
            [self.teachers.forward_passes - passes_before, self.own_answer_passes - own_before], "the teacher passes"))
        result = self._result(domain, history, elapsed, out, len(kept) + len(picked), all_passes - own_passes,
                              before, after)
        result.samples_generated, result.own_answer_passes = len(picked), own_passes
        result.phase_seconds = clock.seconds
        if distributed.is_leader():
            atomic_write_json(out / KD_METRICS_FILE, result.as_dict())
        self.callbacks.on_stage(domain, f"held-out before  {_words(before.get(''))}")
        self.callbacks.on_stage(domain, f"held-out after   {_words(after.get(''))}")
        self.callbacks.on_stage(domain, f"adapter {out} ({elapsed:.1f}s, {result.num_examples} examples, {len(picked)} "
                                        f"on-policy, {result.teacher_forward_passes} teacher passes over traces, "
                                        f"{own_passes} over the student's answers)")
        return result

    def _train(self, domain, tokenizer, train, later_chats, held, own, out, options, clock):
        """The train phase: the student (from options.warm_start, or options.resume's checkpoint) is
        measured, then trains on `train` in rounds; at the start of round r + 1 it answers
        later_chats[r] as it stands, is released while the teacher scores the answers, and goes on
        from its checkpoint with them added. The adapter is saved to `out`, the teacher-forced metrics
        after taken. Returns (history, seconds of training, metrics before, metrics after)."""
        c = self.config
        with clock("train"):
            model, _, adapter_config = self.load_student(options.warm_start)
            before = self._measure(model, held, own)
            resume = self._resume(domain, model, options.resume)
            adapter_config = {"model": self.student_model_id, **adapter_config,
                              "kd": {**asdict(self.config), "teacher": self.teacher_model_id, "domain": domain}}
            self.callbacks.on_train_start(domain, c.num_iters, resume[1] if resume else 0)
        history, elapsed, step = [], 0.0, resume[1] if resume else 0
        for boundary, chats in zip(round_boundaries(c.num_iters, len(later_chats) + 1), later_chats):
            if boundary > step:
                with clock("train"):
                    tic = time.perf_counter()
                    history += train_kd(model, train, c, adapter_config, out, self.callbacks, resume, boundary)
                    elapsed += time.perf_counter() - tic
                step, resume = boundary, (out / f"checkpoint_{boundary}", boundary)
            with clock("sample"):
                self.callbacks.on_stage(domain, f"step {step}: the student answers {len(chats)} train prompts "
                                                "(on-policy)")
                answers = _answered(model, tokenizer, chats, c.sample_max_tokens, c.sample_temperature,
                                    c.seed + step)
                del model
                free_memory()
            with clock("teacher"):
                try:
                    train = train + self._own_examples(answers)
                except TrainingInterrupted:
                    raise TrainingInterrupted(step, resume[0] if resume else None) from None
                self.teachers.release()
            with clock("train"):
                model, _, _ = self.load_student(resume[0] if resume else options.warm_start)
        with clock("train"):
            tic = time.perf_counter()
            history += train_kd(model, train, c, adapter_config, out, self.callbacks, resume)
            elapsed += time.perf_counter() - tic
        with clock("evaluate"):
            after = self._measure(model, held)
            if distributed.is_leader():
                save_inference_adapter(out, model, adapter_config)
            del model
            free_memory()
        return history, elapsed, before, after

    def _answers(self, domain, adapter, train_chats, held_sets, tool_held=(), form_held=()):
        """The student with `adapter` answers: train chats sampled at sample_temperature, every held-out
        prompt and every tool-call trace of `tool_held` greedily, and each trace of `form_held` greedily
        twice, free and held to its response_format. Returns (tokenizer, [(prompt ids, answer ids)] of the
        train chats, {set name: the same of its held-out prompts}, [answer ids] of tool_held, ([answer
        ids] free, [answer ids] held) of form_held); the student is released before it returns."""
        c = self.config
        model, tokenizer, _ = self.load_student(adapter)
        self.teachers.set_vocab_limit(output_vocab_size(model))
        n_held = len(held_sets.get("", []))
        if train_chats or n_held:
            self.callbacks.on_stage(domain, f"the student answers {len(train_chats)} train prompts (on-policy) "
                                            f"and {n_held} held-out")
        sampled = _answered(model, tokenizer, train_chats, c.sample_max_tokens, c.sample_temperature, c.seed)
        flat = [to_chat(domain, p) for items in [*held_sets.values(), tool_held, form_held] for p in items]
        # a prompt in both is answered once (answer_tokens): the tool metric reads the on-policy answers
        answered = iter(_answered(model, tokenizer, flat, c.sample_max_tokens, 0.0, c.seed))
        held = {name: [next(answered) for _ in items] for name, items in held_sets.items()}
        tool_answers = [next(answered)[1] for _ in tool_held]
        form_answers = ([next(answered)[1] for _ in form_held],
                        _held_answers(model, tokenizer, [to_chat(domain, p) for p in form_held],
                                      [p["response_format"] for p in form_held], c.sample_max_tokens))
        del model
        free_memory()
        return tokenizer, sampled, held, tool_answers, form_answers

    def _own_examples(self, answers: list[tuple[list[int], list[int]]]) -> list[KDExample]:
        """KD examples of the student's own answers, every token scored by the teacher(s)."""
        passes = self.teachers.forward_passes
        mine = self.teachers.token_examples([(prompt + answer, len(prompt)) for prompt, answer in
                                             distributed.shard(answers)], True, self._check_stop)
        self.own_answer_passes += self.teachers.forward_passes - passes
        return distributed.gather(mine, _encode_examples, _decode_examples, "the teacher's scores of the answers")

    def _targets(self, domain, tokenizer, prompts, sampled, held_sets, held_own):
        """Teacher targets of the train prompts, the student's samples, each named held-out set and the
        student's answers to it; the teacher is then released."""
        n_held = len(held_sets.get("", []))
        self.callbacks.on_stage(domain, f"teacher targets for {len(prompts) + len(sampled)} prompts"
                                        + (f" ({len(sampled)} answered by the student)" if sampled else "")
                                        + (f" + {n_held} held-out" if n_held else ""))
        train = self.teacher_examples(domain, prompts, tokenizer) + self._own_examples(sampled)
        held = {name: self.teacher_examples(domain, items, tokenizer) for name, items in held_sets.items()}
        own = {name: self._own_examples(answers) for name, answers in held_own.items()}
        self.teachers.release()
        return train, held, own

    def _measure(self, model, held: dict[str, list[KDExample]], own: dict | None = None) -> dict[str, dict]:
        """Held-out metrics of each named set, in the training window; with `own` (the model's own
        answers to those sets, scored), the on-policy ones too."""
        measured = {}
        for name, examples in held.items():
            measured[name] = heldout_metrics(model, examples, max_seq_length=self.config.max_seq_length).as_dict()
            if own:
                measured[name]["on_policy"] = heldout_metrics(
                    model, own[name], max_seq_length=self.config.max_seq_length).as_dict()
        return measured

    def _measure_own(self, domain, adapter, held_sets, tool_held=(), form_held=()):
        """On-policy held-out metrics of the adapter: it answers, the teacher scores the answers, it is
        measured on them; one model resident at a time. Also returns its greedy answers to tool_held,
        {set name: its (prompt, answer) ids}, and its answers to form_held, free and held."""
        if not held_sets and not tool_held and not form_held:
            return {}, [], {}, ([], [])
        _, _, answered, tool_answers, form_answers = self._answers(domain, adapter, [], held_sets, tool_held,
                                                                   form_held)
        if not held_sets:
            return {}, tool_answers, {}, form_answers
        self.callbacks.on_stage(domain, "teacher targets for the candidate's held-out answers")
        own = {name: self._own_examples(answers) for name, answers in answered.items()}
        self.teachers.release()
        model, tokenizer, _ = self.load_student(adapter)
        measured = {name: heldout_metrics(model, examples, max_seq_length=self.config.max_seq_length).as_dict()
                    for name, examples in own.items()}
        if "" in own:  # each answer's own confidence and teacher-scored KL: what serving's acceptance is fitted on
            scores = answer_scores(model, own[""], max_seq_length=self.config.max_seq_length)
            eos = set(tokenizer.eos_token_ids)
            for score, example in zip(scores, own[""], strict=True):
                tokens = example.answer_tokens.tolist()
                score["repeated_4grams"] = answer_checks(tokenizer, [tokens])["repeated_4grams"]
                score["ended"] = bool(tokens) and tokens[-1] in eos
            measured[""]["answer_scores"] = scores
        del model
        free_memory()
        return measured, tool_answers, answered, form_answers

    def _resume(self, domain, model, resume):
        """The resume point if its checkpoint's weights loaded into `model`, else None (start over).
        Data-parallel: rank 0's checkpoint decides for every rank (train_kd gives them its weights)."""
        loaded = bool(resume and distributed.is_leader() and load_adapter_weights(model, resume[0]))
        if distributed.size() > 1:
            loaded = distributed.agree(loaded, "whether rank 0 resumes")
        if loaded:
            self.callbacks.on_stage(domain, f"resuming from {resume[0]} at step {resume[1]}")
            return resume
        return None

    def _result(self, domain, history, elapsed, out, n_train, passes, before, after) -> DistillResult:
        last = history[-1]
        groups = {name: {"before": before[name], "after": after[name]} for name in before if name}
        return DistillResult(
            domain=domain, final_kd_loss=last["kd"], final_ce_loss=last["ce"],
            final_combined_loss=last["combined"], training_time_seconds=elapsed,
            adapter_path=str(out), history=history, num_examples=n_train, teacher_forward_passes=passes,
            heldout_before=before.get(""), heldout_after=after.get(""),
            heldout_groups=groups or None,
        )

    def distill_all(self, domains=None, heldout_fraction: float = 0.1) -> list[DistillResult]:
        """Distil every domain from DOMAIN_PROMPTS; writes <output-dir>/adapters_kd/kd_summary.json."""
        from conch_dna.kit.seeds import DOMAIN_PROMPTS

        results = []
        for domain in domains or DOMAINS:
            train, held = split_prompts(DOMAIN_PROMPTS[domain]["examples"], heldout_fraction)
            results.append(self.distill_domain(domain, train, held))
        atomic_write_json(self.output_dir / ADAPTERS_DIR / "kd_summary.json", [r.as_dict() for r in results])
        return results


def _answer_report(tokenizer, answered, metrics: dict, teacher_examples: list[KDExample], budget: int) -> dict:
    """answer_checks of a version's greedy held-out answers, with what to read them against: the teacher's
    answers' mean length and the share that end within the version's answer budget, the version's token
    entropy over its own answers and the teacher's over its own."""
    report = answer_checks(tokenizer, [a for _, a in answered])
    teacher, eos = [e.answer_tokens.tolist() for e in teacher_examples], set(tokenizer.eos_token_ids)
    report["teacher_tokens"] = sum(map(len, teacher)) / max(len(teacher), 1)
    report["teacher_ended"] = sum(0 < len(t) <= budget and t[-1] in eos for t in teacher) / max(len(teacher), 1)
    report["entropy"] = (metrics.get("on_policy") or {}).get("entropy", float("nan"))
    report["teacher_entropy"] = metrics.get("teacher_entropy", float("nan"))
    return report


def _held_answers(model, tokenizer, chats, forms: list[dict], max_tokens: int) -> list[list[int]]:
    """Greedy answer ids to each chat, held to its response_format (ended with an end-of-turn token when it
    ended, as answer_tokens' are)."""
    if not chats:
        return []
    from mlx_lm import stream_generate

    grammars = Grammars(tokenizer, output_vocab_size(model))
    out = []
    for chat, form in zip(chats, forms):
        held = held_to(grammars.matcher(form), grammars.vocab_size)
        ids = [r.token for r in stream_generate(model, tokenizer, prompt_tokens(tokenizer, chat.messages, chat.tools),
                                                max_tokens=max_tokens, logits_processors=[held])]
        out.append(ids)
    return out


def _answered(model, tokenizer, chats, max_tokens: int, temperature: float, seed: int):
    """answer_tokens of the chats, each rank answering its share (data-parallel), everyone getting all."""
    mine = answer_tokens(model, tokenizer, distributed.shard(chats), max_tokens, temperature, seed)
    return distributed.gather(mine, lambda pairs: distributed.encode_arrays(
        [{"prompt": np.asarray(p, np.int32), "answer": np.asarray(a, np.int32)} for p, a in pairs]),
        lambda blob: [(d["prompt"].tolist(), d.get("answer", np.zeros(0, np.int32)).tolist())
                      for d in distributed.decode_arrays(blob)], "the student's answers")


def _encode_examples(examples: list[KDExample]) -> bytes:
    return distributed.encode_arrays([{"tokens": e.tokens, "offset": e.offset, "topk_ids": e.topk_ids,
                                       "topk_logprobs": e.topk_logprobs, "on_policy": e.on_policy,
                                       "hidden": e.hidden} for e in examples])


def _decode_examples(blob: bytes) -> list[KDExample]:
    return [KDExample(d["tokens"], int(d["offset"]), d["topk_ids"], d["topk_logprobs"], bool(d["on_policy"]),
                      d.get("hidden")) for d in distributed.decode_arrays(blob)]



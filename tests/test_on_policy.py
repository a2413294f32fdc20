"""On-policy distillation on the tiny kit: the student's own answers, scored by the teacher."""

import gc
import json
import weakref

from conch_dna.lifecycle.gate import decide
from conch_dna.models.versions import current_adapter_path
from conch_dna.settings.config import Config, GateMetric, parse_config
from conch_dna.traces.store import TraceStore
from conch_dna.training import distiller as distiller_module
from conch_dna.training import true_kd
from conch_dna.training.data import KDExample, collate
from conch_dna.training.evaluation import heldout_metrics
from conch_dna.training.kd_config import KDConfig
from conch_dna.training.on_policy import answer_tokens, pick_on_policy, prompt_part, round_groups
from conch_dna.training.targets import teacher as teacher_module
from conch_dna.training.targets.teacher import TeacherCache, TeacherScorer

import numpy as np
import pytest

from tests.conftest import retrain, run_module
from tests.test_daemon import drop, teacher_traces, write_config


class ResidentModels:
    """Wraps load_model where the engine calls it: every load asserts that no model of the other kind
    (teacher or student) is still alive, after a garbage collection."""

    def __init__(self, teacher_id: str, monkeypatch):
        self.teacher_id, self.loads, self.live = teacher_id, [], []
        original = distiller_module.load_model

        def load(model_id, *args, **kwargs):
            kind = "teacher" if model_id == self.teacher_id else "student"
            gc.collect()
            others = [k for k, ref in self.live if k != kind and ref() is not None]
            assert not others, f"{kind} loaded while a {others[0]} is resident"
            model, tokenizer = original(model_id, *args, **kwargs)
            self.loads.append(kind)
            self.live.append((kind, weakref.ref(model)))
            return model, tokenizer

        monkeypatch.setattr(distiller_module, "load_model", load)
        monkeypatch.setattr(teacher_module, "load_model", load)


def test_a_retrain_with_on_policy_samples_scores_them_and_never_holds_both_models(tmp_path, monkeypatch):
    home = tmp_path / "home"
    write_config(home, min_heldout=1000)  # --force promotes past the gate: this test is about what is measured
    config_text = (home / "config.toml").read_text().replace(
        "on_policy = 0\n", "on_policy = 0.5\non_policy_rounds = 1\nsample_max_tokens = 24\n")
    (home / "config.toml").write_text(config_text)
    drop(home, "d.jsonl", teacher_traces("debug", 36, seed=5))
    store = TraceStore.for_home(home, parse_config(config_text))
    from conch_dna.traces.ingest import ingest_file

    ingest_file(store, home / "inbox" / "d.jsonl")
    n_train = store.counts("debug").train
    models = ResidentModels(parse_config(config_text).teacher, monkeypatch)
    scored = []
    original_scored = TeacherScorer.scored
    monkeypatch.setattr(TeacherScorer, "scored", lambda self, tokens, offset: scored.append(tokens)
                        or original_scored(self, tokens, offset))

    result = retrain(home, "debug", iters=6, force=True)

    assert str(result.status) == "promoted" and result.reason.startswith("forced"), result.reason
    # the student answered, the teacher scored, the student trained, then the candidate answered and
    # the teacher scored again: each load found the other model gone
    assert models.loads == ["student", "teacher", "student", "student", "teacher", "student"]
    run = store.runs("debug")[0]
    assert run.samples_generated == round(0.5 * n_train) > 0
    assert set(run.phase_seconds) == {"sample", "teacher", "train", "evaluate"}
    assert all(v >= 0 for v in run.phase_seconds.values())
    # the teacher scored the traces it kept, the student's samples, and the held-out prompts three times:
    # with its own answers, the current version's and the candidate's
    heldout = store.counts("debug").heldout
    assert len(scored) == n_train + 3 * heldout
    for side in (run.current_metrics, run.candidate_metrics):
        assert side["tokens"] > 0 and side["on_policy"]["tokens"] > 0
        assert side["on_policy"]["kl"] != side["kl"]
    report = json.loads((current_adapter_path(home, "debug") / "kd_metrics.json").read_text())
    assert report["samples_generated"] == run.samples_generated
    # passes over traces and over the student's answers are counted apart (a candidate answering a
    # held-out prompt as the current version did costs no second pass: the cache has it)
    assert report["teacher_forward_passes"] == n_train - run.samples_generated + heldout
    assert run.samples_generated + heldout <= report["own_answer_passes"] <= run.samples_generated + 2 * heldout
    assert report["heldout_after"]["on_policy"] == run.candidate_metrics["on_policy"]
    env = {"CONCH_HOME": str(home), "COLUMNS": "250"}
    table = run_module("conch_dna.cli", "kd", "status", env=env).stdout
    assert "on-policy KL" in table and f"{run.candidate_metrics['on_policy']['kl']:.4f}" in table
    history = run_module("conch_dna.cli", "kd", "history", "--domain", "debug", env=env).stdout
    assert run.kl_change(on_policy=True) in history and f" {run.samples_generated} " in history


def test_the_on_policy_heldout_kl_is_the_kl_over_the_versions_own_greedy_answers(kit, tmp_path):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    config = KDConfig(num_iters=8, learning_rate=1e-3, lora_rank=8, sample_max_tokens=20)
    distiller = true_kd.TrueKnowledgeDistiller(kit["teacher"], kit["student"], config, output_dir=tmp_path)
    prompts = [f"Why did the build fail on step {i}?" for i in range(10)]
    held = [f"Why is the queue {i} slow?" for i in range(4)]
    result = distiller.distill_domain("thinking", prompts, held)

    # the reference: mlx-lm's one-row generate_step, greedy, up to and with the end of turn, and a
    # fresh teacher scorer
    model, tokenizer, _ = distiller.load_student(result.adapter_path)
    scorer = TeacherScorer(kit["teacher"], TeacherCache(tmp_path / "fresh"), config.top_k)
    examples = []
    for p in held:
        prompt = tokenizer.apply_chat_template(true_kd.to_messages("thinking", p), add_generation_prompt=True)
        answer = []
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=20):
            answer.append(int(token))
            if answer[-1] in tokenizer.eos_token_ids:
                break
        examples.append(scorer.token_example(prompt + answer, len(prompt), on_policy=True))
    scorer.release()
    reference = heldout_metrics(model, examples)
    own = result.heldout_after["on_policy"]
    assert own["tokens"] == reference.tokens
    assert own["kl"] == pytest.approx(reference.kl, rel=1e-3)
    assert own["agreement"] == pytest.approx(reference.agreement)


def test_an_on_policy_example_trains_towards_the_teachers_top1_not_its_own_tokens():
    tokens = np.array([5, 6, 7, 8, 9], np.int32)
    ids = np.array([[17, 7], [18, 8], [19, 9]], np.int32)
    lps = np.log(np.array([[0.6, 0.3]] * 3, np.float16))
    off = KDExample(tokens, 2, ids, lps)
    own = KDExample(tokens, 2, ids, lps, on_policy=True)
    _, targets, mask, _, _ = collate([off, own], max_seq_length=64)
    answer = np.asarray(mask[0]).astype(bool)
    assert np.asarray(targets)[0][answer].tolist() == [7, 8, 9]
    assert np.asarray(targets)[1][answer].tolist() == [17, 18, 19]
    assert np.asarray(targets)[1][:1].tolist() == [6]  # the prompt part is untouched


def test_pick_on_policy_takes_the_share_drawn_by_the_seed():
    assert pick_on_policy(10, 0.0, 0) == []
    assert pick_on_policy(10, 1.0, 0) == list(range(10))
    half = pick_on_policy(9, 0.5, 3)
    assert len(half) == 4 and half == sorted(set(half)) and half == pick_on_policy(9, 0.5, 3)
    assert pick_on_policy(40, 0.5, 1) != pick_on_policy(40, 0.5, 2)


def test_answer_tokens_are_what_the_model_wrote_each_prompt_once_with_the_seed(student):
    from conch_dna.models.chat import prompt_tokens

    model, tokenizer = student
    ask = [{"role": "user", "content": "Why is the sky blue?"}]
    answered = [*ask, {"role": "assistant", "content": "old answer"}]
    other = [{"role": "user", "content": "Plan a trip."}]
    assert prompt_part(answered) == ask and prompt_part(ask) == ask
    first = answer_tokens(model, tokenizer, [ask, answered, other], 16, 1.0, seed=7)
    assert [p for p, _ in first] == [prompt_tokens(tokenizer, ask)] * 2 + [prompt_tokens(tokenizer, other)]
    assert first[0] == first[1] and all(0 < len(a) <= 16 for _, a in first)
    for _, a in first:  # an answer ends at the end of turn it wrote, or at max_tokens
        assert len(a) == 16 or (a[-1] in tokenizer.eos_token_ids and not set(a[:-1]) & set(tokenizer.eos_token_ids))
    assert answer_tokens(model, tokenizer, [ask, answered, other], 16, 1.0, seed=7) == first
    samples = {tuple(answer_tokens(model, tokenizer, [ask], 16, 1.0, seed=s)[0][1]) for s in range(4)}
    assert len(samples) > 1  # sampled, not greedy


def test_the_gate_compares_the_metric_config_chooses():
    current = {"kl": 1.0, "agreement": 0.5, "tokens": 400, "on_policy": {"kl": 0.5, "agreement": 0.5, "tokens": 300}}
    candidate = {"kl": 0.5, "agreement": 0.5, "tokens": 400, "on_policy": {"kl": 0.6, "agreement": 0.5, "tokens": 300}}
    forced = Config(min_heldout=1)
    own = Config(min_heldout=1, gate_metric=GateMetric.ON_POLICY)
    assert decide(current, candidate, 10, forced, "task", False)[0] is True
    promoted, reason = decide(current, candidate, 10, own, "task", False)
    assert promoted is False and reason.startswith("on-policy held-out KL 0.5000 -> 0.6000")
    assert decide(candidate, current, 10, own, "task", False)[0] is True
    old = {k: v for k, v in current.items() if k != "on_policy"}
    assert decide(old, candidate, 10, own, "task", False) == (False, "no on-policy held-out metrics")
    established = {"before": {**current, "on_policy": {**current["on_policy"], "kl": 0.1}}, "after": candidate}
    assert decide(candidate, current, 10, own, "task", False, established)[0] is False  # 0.1 -> 0.6 there
    assert decide(current, candidate, 10, forced, "task", False, established)[0] is True  # 1.0 -> 0.5 there
    assert parse_config('gate_metric = "on_policy"').gate_metric is GateMetric.ON_POLICY
    with pytest.raises(ValueError, match="gate_metric"):
        parse_config('gate_metric = "vibes"')


def test_on_policy_rounds_answer_each_share_with_the_student_as_it_stands(kit, tmp_path, monkeypatch):
    models = ResidentModels(kit["teacher"], monkeypatch)
    calls = []
    original = distiller_module.answer_tokens

    def recorded(model, tokenizer, chats, max_tokens, temperature, seed):
        answers = original(model, tokenizer, chats, max_tokens, temperature, seed)
        calls.append((seed, temperature, answers))
        return answers

    monkeypatch.setattr(distiller_module, "answer_tokens", recorded)
    config = KDConfig(num_iters=6, learning_rate=1e-2, lora_rank=8, sample_max_tokens=12, on_policy=1.0,
                      on_policy_rounds=3, sample_temperature=1.0, seed=5)  # sampled, told from greedy held-out
    distiller = true_kd.TrueKnowledgeDistiller(kit["teacher"], kit["student"], config, output_dir=tmp_path)
    prompts = [f"Why did the build fail on step {i}?" for i in range(9)]
    result = distiller.distill_domain("thinking", prompts, ["Why is the queue slow?", "Why is it late?"])

    # the bare student answers a third of the prompts and the held-out ones; the teacher scores; the
    # student trains to step 2, answers the next third, leaves while the teacher scores, comes back from
    # its checkpoint; again at step 4; then the candidate is measured
    assert models.loads == ["student", "teacher"] + ["student", "teacher"] * 2 + ["student"] \
        + ["student", "teacher", "student"]
    sampled = [(seed, answers) for seed, temperature, answers in calls if temperature > 0 and answers]
    assert [seed for seed, _ in sampled] == [5, 7, 9] and [len(a) for _, a in sampled] == [3, 3, 3]
    for step, (seed, answers) in zip((2, 4), sampled[1:]):
        model, tokenizer, _ = distiller.load_student(tmp_path / "adapters_kd" / "thinking" / f"checkpoint_{step}")
        chats = [true_kd.to_messages("thinking", prompts[i]) for i in range(step // 2, 9, 3)]
        assert original(model, tokenizer, chats, 12, 1.0, seed) == answers
        bare, _, _ = distiller.load_student()
        assert original(bare, tokenizer, chats, 12, 1.0, seed) != answers
        del model, bare
    # every prompt answered once, by the student: no teacher pass over a trace but the held-out ones
    assert result.samples_generated == 9 and result.num_examples == 9
    assert result.teacher_forward_passes == 2 and 9 + 2 <= result.own_answer_passes <= 9 + 4
    assert [r["iteration"] for r in result.history] == [2, 4, 6]
    assert set(result.phase_seconds) == {"sample", "teacher", "train", "evaluate"}


def test_rounds_are_never_more_than_the_prompts_to_answer():
    assert round_groups([], 8) == [[]]
    assert round_groups([4, 7, 9], 8) == [[4], [7], [9]]
    assert round_groups(list(range(11)), 8) == [[0, 8], [1, 9], [2, 10], [3], [4], [5], [6], [7]]


def test_an_off_policy_run_loads_each_model_for_its_phases_only_whatever_the_rounds(kit, tmp_path, monkeypatch):
    models = ResidentModels(kit["teacher"], monkeypatch)
    config = KDConfig(num_iters=4, lora_rank=8, sample_max_tokens=8, on_policy=0.0, on_policy_rounds=8)
    result = true_kd.TrueKnowledgeDistiller(kit["teacher"], kit["student"], config, output_dir=tmp_path).distill_domain(
        "thinking", [f"Why did the build fail on step {i}?" for i in range(6)], ["Why is the queue slow?"])
    # held-out answers, targets, training, then the candidate's answers, their targets (the teacher only
    # for answers not in the cache), its measure: no round reloads the student with nothing to answer
    assert models.loads[:3] == ["student", "teacher", "student"] and models.loads.count("student") == 4
    assert result.samples_generated == 0 and [r["iteration"] for r in result.history][-1] == 4


def test_a_run_in_rounds_resumes_from_its_checkpoint(kit, tmp_path):
    from tests.conftest import Hooks

    config = KDConfig(num_iters=6, learning_rate=1e-2, lora_rank=8, sample_max_tokens=12, on_policy=0.5,
                      on_policy_rounds=3, steps_per_save=100, steps_per_report=1)
    prompts = [f"Why did the build fail on step {i}?" for i in range(12)]
    stopping = Hooks(should_stop=lambda: any(r["iteration"] >= 3 for r in stopping.reports))
    distiller = true_kd.TrueKnowledgeDistiller(kit["teacher"], kit["student"], config, output_dir=tmp_path,
                                               callbacks=stopping)
    with pytest.raises(true_kd.TrainingInterrupted) as stopped:
        distiller.distill_domain("task", prompts)
    assert stopped.value.iteration == 3 and stopped.value.checkpoint.name == "checkpoint_3"

    distiller.callbacks = Hooks()
    resumed = distiller.distill_domain("task", prompts, options=true_kd.DistillOptions(
        resume=(stopped.value.checkpoint, 3)))
    assert [r["iteration"] for r in resumed.history] == [4, 5, 6]
    assert resumed.samples_generated == 6 and resumed.num_examples == 12
    # round 1's answers came from the student at step 2: the resumed one writes them anew at step 3 (its
    # round 0 is the bare student's again, scored from the cache), and round 2's at step 4
    assert resumed.own_answer_passes == 2 + 2

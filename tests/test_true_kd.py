"""The KD engine on the shipped tiny kit: real mlx_lm.load, real training steps, real files."""

import json
import stat

from conch_dna.kit.seeds import DOMAIN_PROMPTS
from conch_dna.models.chat import encode_chat
from conch_dna.training.data import collate
from conch_dna.training.evaluation import heldout_metrics
from conch_dna.training.targets.teacher import TeacherCache, TeacherScorer
from conch_dna.training.true_kd import (
    KDConfig,
    TrueKnowledgeDistiller,
    get_kd_adapter_path,
    split_prompts,
)

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate, load

from tests.conftest import Hooks, run_module

CHAT = [
    {"role": "system", "content": "You are the action neuron. Answer with one JSON tool call."},
    {"role": "user", "content": "Use a tool to read notes.txt."},
    {"role": "assistant", "content": '{"tool": "read_file", "args": {"path": "notes.txt"}}'},
]


@pytest.mark.parametrize("field,value,words", [
    ("temperature", 0.1, "KDConfig.temperature must be in [0.5, 10.0], got 0.1"),
    ("alpha", 1.5, "KDConfig.alpha must be in [0.0, 1.0], got 1.5"),
    ("lora_rank", 2, "KDConfig.lora_rank must be in [4, 64], got 2"),
    ("lora_rank", 8.5, "KDConfig.lora_rank must be an integer"),
    ("learning_rate", 0.0, "KDConfig.learning_rate must be in [1e-06, 0.01]"),
    ("divergence", "l2", "KDConfig.divergence must be one of forward_kl, reverse_kl, jsd"),
])
def test_kd_config_rejects_out_of_range_values_by_name(field, value, words):
    with pytest.raises(ValueError) as err:
        KDConfig(**{field: value})
    assert words in str(err.value)


def test_teacher_is_far_from_uniform_and_sharper_than_the_student(kit):
    import math

    from conch_dna.kit import corpus
    from conch_dna.kit.build import answer_entropy

    dialogues = corpus.dialogues(60, seed=99)
    teacher, tokenizer = load(kit["teacher"])
    student, _ = load(kit["student"])
    t_entropy = answer_entropy(teacher, tokenizer, dialogues)
    assert t_entropy < 0.25 * math.log(len(tokenizer))
    assert t_entropy < answer_entropy(student, tokenizer, dialogues)


def test_collate_masks_exactly_the_answer_tokens(student):
    _, tokenizer = student
    tokens, offset = encode_chat(tokenizer, CHAT)
    n_answer = len(tokens) - offset
    ids = np.arange(n_answer * 3, dtype=np.int32).reshape(n_answer, 3)
    from conch_dna.training.data import KDExample

    ex = KDExample(np.array(tokens, np.int32), offset, ids, np.zeros((n_answer, 3), np.float16))
    inputs, targets, mask, topk_ids, _ = collate([ex], 2048)
    m = np.array(mask[0])
    assert m.sum() == n_answer
    positions = np.nonzero(m)[0]
    assert positions[0] == offset - 1
    # the target at each masked position is the answer token the teacher row describes
    assert np.array(targets[0])[positions].tolist() == tokens[offset:]
    assert np.array(topk_ids[0])[positions].tolist() == ids.tolist()
    assert tokenizer.decode(tokens[offset:]).startswith('{"tool"')


def test_teacher_targets_are_cached_and_match_a_full_softmax(kit, student, tmp_path):
    _, tokenizer = student
    cache = TeacherCache(tmp_path / "cache")
    scorer = TeacherScorer(kit["teacher"], cache, top_k=64, vocab_limit=len(tokenizer))
    tokens, offset = encode_chat(tokenizer, CHAT)
    ids, logprobs = scorer.targets(tokens, offset)
    assert scorer.forward_passes == 1
    assert ids.shape == (len(tokens) - offset, 64) and logprobs.dtype == np.float32

    teacher, _ = load(kit["teacher"])
    logits = teacher(mx.array(tokens[:-1])[None])[0, offset - 1:]
    full = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    # stored packed: log-probs to 8 bits on a square-root scale (finest near p = 1), the top-1 exact;
    # half a level of sqrt(-log p / DEPTH) moves p by at most max_p p·sqrt(-log p·DEPTH)/LEVELS (at
    # p = e^-1/2): 0.0092
    from conch_dna.training.targets.topk_codec import DEPTH, LEVELS

    bound = np.exp(-0.5) * np.sqrt(0.5 * DEPTH) / LEVELS
    exact = np.take_along_axis(full, ids, -1)
    assert np.allclose(np.exp(exact), np.exp(logprobs.astype(np.float32)), atol=bound * 1.01)
    assert (ids[:, 0] == full[:, : len(tokenizer)].argmax(-1)).all()
    assert (np.diff(logprobs.astype(np.float32), axis=-1) <= 1e-3).all()

    again = TeacherScorer(kit["teacher"], TeacherCache(tmp_path / "cache"), top_k=64)
    ids2, lp2 = again.targets(tokens, offset)
    assert again.forward_passes == 0 and not again.loaded
    assert (ids2 == ids).all() and (lp2 == logprobs).all()

    files = list((tmp_path / "cache").rglob("*.topk"))
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert files[0].stat().st_size / len(ids) <= 150


def test_torn_cache_file_is_a_miss_not_a_crash(kit, student, tmp_path):
    _, tokenizer = student
    scorer = TeacherScorer(kit["teacher"], TeacherCache(tmp_path), top_k=8)
    tokens, offset = encode_chat(tokenizer, CHAT)
    scorer.targets(tokens, offset)
    path = scorer.cache.path(scorer.cache.key(kit["teacher"], tokens, offset, 8))
    path.write_bytes(path.read_bytes()[:40])
    ids, _ = scorer.targets(tokens, offset)
    assert scorer.forward_passes == 2 and ids.shape[1] == 8


def test_teacher_answers_a_prompt_once(kit, student, tmp_path):
    _, tokenizer = student
    scorer = TeacherScorer(kit["teacher"], TeacherCache(tmp_path), top_k=8, max_answer_tokens=60)
    chat = scorer.complete(CHAT[:2], tokenizer)
    assert chat[-1]["role"] == "assistant" and chat[-1]["content"].startswith('{"tool": "')
    fresh = TeacherScorer(kit["teacher"], TeacherCache(tmp_path), top_k=8, max_answer_tokens=60)
    assert fresh.complete(CHAT[:2], tokenizer) == chat and not fresh.loaded


@pytest.fixture(scope="module")
def distilled(kit, tmp_path_factory):
    """One real distillation of the `action` domain on the kit, shared by the tests below."""
    out = tmp_path_factory.mktemp("kd")
    train, held = split_prompts(DOMAIN_PROMPTS["action"]["examples"], 0.15)
    config = KDConfig(num_iters=60, learning_rate=1e-3, lora_rank=8, steps_per_save=25,
                      max_answer_tokens=64)
    distiller = TrueKnowledgeDistiller(kit["teacher"], kit["student"], config, output_dir=out)
    result = distiller.distill_domain("action", train, held)
    return distiller, result, out, held


def test_true_kd_lowers_heldout_kl_clearly(distilled):
    _, result, _, held = distilled
    assert len(held) >= 5
    before, after = result.heldout_before, result.heldout_after
    assert after["kl"] < 0.8 * before["kl"]
    assert after["agreement"] >= before["agreement"]
    assert result.history[-1]["kd"] < result.history[0]["kd"]


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_the_other_divergences_train_end_to_end_and_lower_heldout_kl(kit, tmp_path, divergence):
    train, held = split_prompts(DOMAIN_PROMPTS["action"]["examples"], 0.15)
    config = KDConfig(num_iters=30, learning_rate=1e-3, lora_rank=8, max_answer_tokens=64, divergence=divergence)
    result = TrueKnowledgeDistiller(kit["teacher"], kit["student"], config, output_dir=tmp_path).distill_domain(
        "action", train, held)
    assert result.heldout_after["kl"] < 0.9 * result.heldout_before["kl"]
    assert result.history[-1]["kd"] < result.history[0]["kd"]
    written = json.loads((get_kd_adapter_path("action", tmp_path) / "adapter_config.json").read_text())
    assert written["kd"]["divergence"] == divergence


def test_adapter_is_mlx_lm_loadable_and_changes_generation(distilled, kit):
    _, result, out, _ = distilled
    path = get_kd_adapter_path("action", out)
    assert result.adapter_path == str(path)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["model"] == kit["student"] and config["fine_tune_type"] == "lora"
    assert config["kd"]["temperature"] == 2.0 and config["kd"]["teacher"] == kit["teacher"]
    assert (path / "checkpoint_25" / "adapters.safetensors").is_file()
    assert (path / "checkpoint_50" / "adapter_config.json").is_file()

    base, tokenizer = load(kit["student"])
    tuned, _ = load(kit["student"], adapter_path=str(path))
    prompt = tokenizer.apply_chat_template(
        [CHAT[0], {"role": "user", "content": "Use a tool to delete app.log."}],
        add_generation_prompt=True)
    assert generate(base, tokenizer, prompt, max_tokens=24) != \
        generate(tuned, tokenizer, prompt, max_tokens=24)


def test_second_run_costs_no_teacher_pass(distilled, tmp_path):
    from dataclasses import replace

    distiller, _, _, held = distilled
    # another output folder, the same teacher cache: the shared fixture's adapter stays as it is
    cache_dir = distiller.teachers.scorers[0].cache.root
    again = TrueKnowledgeDistiller(distiller.teacher_model_id, distiller.student_model_id,
                                   replace(distiller.config, num_iters=2), output_dir=tmp_path,
                                   cache_dir=cache_dir).distill_domain("action", held[:2])
    assert again.teacher_forward_passes == 0 and again.num_examples == 2


def test_lora_on_a_quantized_student(kit, tmp_path):
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, tokenizer, config = load(kit["student"], return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=4)
    qdir = tmp_path / "student-4bit"
    save_model(qdir, model)
    save_config(config, qdir / "config.json")
    tokenizer.save_pretrained(str(qdir))

    train, held = split_prompts(DOMAIN_PROMPTS["task"]["examples"][:32], 0.25)
    distiller = TrueKnowledgeDistiller(
        kit["teacher"], str(qdir),
        KDConfig(num_iters=25, learning_rate=1e-3, lora_rank=8, max_answer_tokens=64, on_policy=0.0),
        output_dir=tmp_path / "out")
    result = distiller.distill_domain("task", train, held)
    assert result.heldout_after["kl"] < result.heldout_before["kl"]
    tuned, _ = load(str(qdir), adapter_path=result.adapter_path)
    assert "QuantizedLinear" in type(tuned.layers[0].self_attn.q_proj.linear).__name__
    examples = distiller.teacher_examples("task", held, tokenizer)
    assert heldout_metrics(tuned, examples).kl == pytest.approx(result.heldout_after["kl"], rel=1e-3)


@pytest.mark.parametrize("args,message", [
    (["--domain", "dreaming", "--kit"], "unknown domain 'dreaming'"),
    (["--domain", "../etc", "--kit"], "invalid domain name '../etc'"),
    (["--domain", "task", "--student", "/no/such/model"], "model path does not exist: /no/such/model"),
    (["--domain", "task", "--kit", "--temperature", "42"], "--temperature must be in [0.5, 10.0], got 42"),
    (["--domain", "task", "--kit", "--iters", "0"], "--iters must be in [1, 1000000], got 0"),
    (["--domain", "task", "--kit", "--on-policy", "1.5"], "--on-policy must be in [0.0, 1.0], got 1.5"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message):
    proc = run_module("conch_dna.training.true_kd", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_cli_trains_a_domain_on_the_kit(tmp_path):
    proc = run_module("conch_dna.training.true_kd", "--kit", "--domain", "memory", "--iters", "3",
                      "--output-dir", str(tmp_path), "--heldout-fraction", "0.2", "--on-policy", "0.25",
                      "--sample-max-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    assert "held-out before" in proc.stderr and "held-out after" in proc.stderr and "on-policy KL" in proc.stderr
    metrics = json.loads((tmp_path / "adapters_kd" / "memory" / "kd_metrics.json").read_text())
    assert metrics["samples_generated"] == round(0.25 * metrics["num_examples"]) > 0
    assert (tmp_path / "adapters_kd" / "memory" / "adapters.safetensors").is_file()
    assert stat.S_IMODE((tmp_path / "teacher_cache").stat().st_mode) == 0o700


def test_distill_all_writes_one_adapter_per_domain_and_a_summary(kit, tmp_path):
    distiller = TrueKnowledgeDistiller(
        kit["teacher"], kit["student"], KDConfig(num_iters=3, max_answer_tokens=48), output_dir=tmp_path)
    results = distiller.distill_all(domains=["memory"], heldout_fraction=0.2)
    summary = json.loads((tmp_path / "adapters_kd" / "kd_summary.json").read_text())
    assert [r["domain"] for r in summary] == ["memory"] == [r.domain for r in results]
    assert summary[0]["heldout_before"]["tokens"] > 0
    assert (tmp_path / "adapters_kd" / "memory" / "adapters.safetensors").is_file()


def test_interrupted_and_resumed_training_ends_where_an_uninterrupted_one_does(distilled, tmp_path):
    """Weights, Adam's moments, the LR schedule and the batch order all resume."""
    from conch_dna.models.adapters import OPTIMIZER_FILE, adapter_weights, apply_lora, load_adapter_weights
    from conch_dna.training.true_kd import TrainingInterrupted, train_kd

    from mlx_lm import load as load_student

    distiller, _, _, held = distilled
    examples = distiller.teacher_examples("action", held, load_student(distiller.student_model_id)[1])
    config = KDConfig(num_iters=12, learning_rate=2e-3, lora_rank=4, batch_size=2,
                      steps_per_save=100, steps_per_report=4, hidden_weight=0.0)

    def fresh_model():
        model, _ = load_student(distiller.student_model_id)
        mx.random.seed(0)  # the same initial lora_a
        return model, apply_lora(model, config.lora_layers, config.lora_rank, config.lora_scale,
                                 config.lora_dropout)

    model, adapter_config = fresh_model()
    train_kd(model, examples, config, adapter_config)
    straight = adapter_weights(model)

    model, adapter_config = fresh_model()
    with pytest.raises(TrainingInterrupted) as stop:
        train_kd(model, examples, config, adapter_config, tmp_path, Hooks(should_stop=lambda: True))
    assert stop.value.iteration == 1 and (stop.value.checkpoint / OPTIMIZER_FILE).is_file()
    first = stop.value
    steps = iter(range(100))
    model, adapter_config = fresh_model()
    load_adapter_weights(model, first.checkpoint)
    with pytest.raises(TrainingInterrupted) as stop:  # resumed once, stopped again at step 5
        train_kd(model, examples, config, adapter_config, tmp_path, Hooks(should_stop=lambda: next(steps) == 3),
                 resume=(first.checkpoint, first.iteration))
    assert stop.value.iteration == 5
    model, adapter_config = fresh_model()
    load_adapter_weights(model, stop.value.checkpoint)
    history = train_kd(model, examples, config, adapter_config, tmp_path,
                       resume=(stop.value.checkpoint, stop.value.iteration))
    assert [h["iteration"] for h in history] == [8, 12]
    resumed = adapter_weights(model)
    assert set(resumed) == set(straight)
    for name in straight:
        np.testing.assert_allclose(np.array(resumed[name]), np.array(straight[name]), rtol=1e-4, atol=1e-6)

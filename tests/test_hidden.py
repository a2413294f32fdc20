"""Layer-wise (hidden-state) distillation: losses against NumPy, the taps, the cache, and a kit run."""

import json
from dataclasses import replace

from conch_dna.models.adapters import PROJECTION_FILE, apply_lora
from conch_dna.models.chat import encode_chat
from conch_dna.training.data import collate
from conch_dna.training.hidden import attach_projection, hidden_loss, kd_hidden_loss, layer_map, student_layers, tapped
from conch_dna.training.kd_config import KDConfig
from conch_dna.training.targets.teacher import TeacherCache, TeacherScorer
from conch_dna.training.true_kd import TrueKnowledgeDistiller, train_kd

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tests.test_true_kd import CHAT, Hooks


def test_hidden_losses_match_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 3, 8)), rng.normal(size=(2, 5, 3, 8)) * 4
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    mse = ((s - t) ** 2).sum(-1) / (t**2).sum(-1)
    cos = 1 - (s * t).sum(-1) / np.sqrt((s**2).sum(-1) * (t**2).sum(-1))
    for kind, per in (("mse", mse), ("cosine", cos)):
        expected = (per.mean(-1) * mask).sum() / mask.sum()
        got = hidden_loss(mx.array(s), mx.array(t), mx.array(mask), kind).item()
        assert got == pytest.approx(expected, rel=1e-5), kind
    assert hidden_loss(mx.array(t), mx.array(t), mx.array(mask), "mse").item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="must be one of mse, cosine"):
        hidden_loss(mx.array(s), mx.array(t), mx.array(mask), "l1")


def test_the_layer_map_spreads_the_student_evenly_or_takes_the_given_one():
    assert layer_map({}, 15, 30) == [(2, 5), (6, 13), (10, 21), (14, 29)]
    assert layer_map({}, 2, 3) == [(0, 0), (1, 2)]
    assert layer_map({"1": 2, "0": 0}, 2, 3) == [(0, 0), (1, 2)]
    assert student_layers({}, 15) == [2, 6, 10, 14]
    with pytest.raises(ValueError, match="student layer 5 to teacher layer 1; the student has 2 layers"):
        layer_map({"5": 1}, 2, 3)
    with pytest.raises(ValueError, match="hidden_layers must map student layer numbers"):
        KDConfig(hidden_layers={"a": 1})


def test_a_tap_reads_a_blocks_output_and_leaves_the_model_as_it_was(student):
    model, tokenizer = student
    tokens, _ = encode_chat(tokenizer, CHAT)
    inputs = mx.array(tokens)[None]
    classes = [type(layer) for layer in model.layers]
    with tapped(model.layers, [len(model.layers) - 1]) as outputs:
        logits = model(inputs)
    assert [type(layer) for layer in model.layers] == classes
    # the last block's output, through the final norm and the (tied) output layer, is the logits
    last = outputs[len(model.layers) - 1]
    again = model.model.embed_tokens.as_linear(model.model.norm(last))
    assert np.allclose(np.array(again), np.array(logits), atol=1e-4)


def test_the_teacher_writes_hidden_states_in_the_same_pass_and_caches_them(kit, student, tmp_path):
    _, tokenizer = student
    tokens, offset = encode_chat(tokenizer, CHAT)
    scorer = TeacherScorer(kit["teacher"], TeacherCache(tmp_path), top_k=8)
    scorer.hidden_layers = [0, 2]
    example = scorer.token_example(tokens, offset)
    assert scorer.forward_passes == 1
    assert example.hidden.shape == (len(tokens) - offset, 2, 96) and example.hidden.dtype == np.float16
    again = TeacherScorer(kit["teacher"], TeacherCache(tmp_path), top_k=8)
    again.hidden_layers = [0, 2]
    assert (again.token_example(tokens, offset).hidden == example.hidden).all() and again.forward_passes == 0
    assert not again.loaded


def test_a_run_with_the_hidden_loss_trains_a_projection_kept_apart_from_the_adapter(kit, tmp_path):
    from mlx_lm import load

    config = KDConfig(num_iters=6, learning_rate=1e-3, lora_rank=8, hidden_weight=1.0, max_answer_tokens=32,
                      on_policy=0.0)
    distiller = TrueKnowledgeDistiller(kit["teacher"], kit["student"], config, output_dir=tmp_path)
    prompts = [f"Why did the build fail on step {i}?" for i in range(6)]
    result = distiller.distill_domain("thinking", prompts, ["Why is it slow?"])
    assert result.teacher_forward_passes == 7  # the hidden states came with the top-k, no extra pass
    logits_only = config.alpha * result.final_kd_loss + (1 - config.alpha) * result.final_ce_loss
    assert result.final_combined_loss > logits_only + 0.05  # the hidden term is in the loss
    out = tmp_path / "adapters_kd" / "thinking"
    projection = mx.load(str(out / PROJECTION_FILE))
    assert list(projection) == ["hidden_projection.weight"] and projection["hidden_projection.weight"].shape == (96, 64)
    assert not any(k.startswith("hidden_projection") for k in mx.load(str(out / "adapters.safetensors")))
    assert json.loads((out / "adapter_config.json").read_text())["kd"]["hidden_weight"] == 1.0
    load(kit["student"], adapter_path=str(out))  # inference needs no projection

    # a run warm-started from an adapter without a projection still starts from its LoRA
    plain = TrueKnowledgeDistiller(kit["teacher"], kit["student"], KDConfig(num_iters=2, lora_rank=8, hidden_weight=0),
                                   output_dir=tmp_path / "plain").distill_domain("thinking", prompts[:2])
    model, _, _ = distiller.load_student(plain.adapter_path)
    weights = dict(mx.load(str(tmp_path / "plain" / "adapters_kd" / "thinking" / "adapters.safetensors")))
    own = dict(tree_flatten(model.trainable_parameters()))
    assert "hidden_projection.weight" in own
    assert all(np.array_equal(np.array(own[name]), np.array(value)) for name, value in weights.items())


def test_train_kd_uses_hidden_states_where_examples_have_them_and_logits_alone_when_none_do(kit, tmp_path):
    from mlx_lm import load

    model, tokenizer = load(kit["student"])
    adapter_config = apply_lora(model, 2, 4, 20.0, 0.0)
    attach_projection(model, 64, 96)
    tokens, offset = encode_chat(tokenizer, CHAT)
    scorer = TeacherScorer(kit["teacher"], TeacherCache(tmp_path), top_k=8)
    scorer.hidden_layers = [0, 2]
    with_hidden = scorer.token_example(tokens, offset)
    captured = replace(with_hidden, hidden=None)  # as a trace whose top-k came from the EGO
    assert train_kd(model, [with_hidden], KDConfig(num_iters=1, top_k=8, hidden_weight=0.0), adapter_config)
    with_loss = KDConfig(num_iters=1, top_k=8, hidden_weight=1.0, batch_size=2)
    mixed = train_kd(model, [with_hidden, captured], with_loss, adapter_config)[-1]
    # the hidden term counts the one example that has hidden states, not the other's zeros
    batch = collate([with_hidden, captured], 2048, hidden_shape=(2, 96))
    assert batch[-1].sum().item() == len(with_hidden.topk_ids) and batch[-1][1].sum().item() == 0

    def hidden_term(examples):
        combined, kd, ce = kd_hidden_loss(model, *collate(examples, 2048, hidden_shape=(2, 96)), temperature=2.0,
                                          alpha=0.5, layers=[0, 1], hidden_kind="mse", hidden_weight=1.0)
        return (combined - 0.5 * kd - 0.5 * ce).item()
    assert hidden_term([with_hidden, captured]) == pytest.approx(hidden_term([with_hidden]), rel=1e-4)
    assert mixed["combined"] > with_loss.alpha * mixed["kd"] + (1 - with_loss.alpha) * mixed["ce"] + 0.05
    hooks = Hooks()
    history = train_kd(model, [captured], with_loss, adapter_config, callbacks=hooks)
    assert hooks.stages == ["no example carries the teacher's hidden states (a top-k captured from the EGO has none): "
                    "this run trains on the logit loss alone"]
    assert history[-1]["combined"] == pytest.approx(
        with_loss.alpha * history[-1]["kd"] + (1 - with_loss.alpha) * history[-1]["ce"], rel=1e-5)
    with pytest.raises(ValueError, match=r"hidden states differ in shape \(layers, width\): \[\(1, 96\), \(2, 96\)\]"):
        train_kd(model, [with_hidden, replace(with_hidden, hidden=with_hidden.hidden[:, :1])], with_loss,
                 adapter_config)


def test_the_origin_map_pairs_each_student_block_with_the_teacher_block_it_was_cut_from(tmp_path):
    from conch_dna.models.realpair import STUDENT_ORIGIN_FILE, kept_layers, student_origin
    from conch_dna.training.hidden import layer_map

    kept = kept_layers(30, 15)  # the real pair's cut: 15 of the teacher's 30 blocks
    assert layer_map({}, 15, 30, kept) == [(s, kept[s]) for s in (2, 6, 10, 14)] != layer_map({}, 15, 30)
    assert layer_map({}, 15, 30, kept)[-1] == (14, 29)  # the last block is the teacher's last
    assert layer_map({"3": 7}, 15, 30, kept) == [(3, 7)]  # an explicit map rules
    assert layer_map({}, 15, 30, kept[:-1]) == layer_map({}, 15, 30)  # an origin that does not fit: by depth
    (tmp_path / STUDENT_ORIGIN_FILE).write_text(json.dumps({"teacher": "t", "kept_layers": kept}))
    assert student_origin(tmp_path) == kept
    for broken in ('{"kept_layers": [3, 1]}', '{"kept_layers": [1, "2"]}', "not json", '{"teacher": "t"}'):
        (tmp_path / STUDENT_ORIGIN_FILE).write_text(broken)
        assert student_origin(tmp_path) is None, broken
    assert student_origin(tmp_path / "elsewhere") is None

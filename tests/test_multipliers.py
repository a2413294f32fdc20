"""Learning-rate multipliers by parameter name, and training in stages, on the kit student."""

from conch_dna.kit import corpus
from conch_dna.models.adapters import apply_lora
from conch_dna.models.chat import encode_chat
from conch_dna.models.loading import load_model
from conch_dna.training.data import KDExample, collate
from conch_dna.training.kd_config import KDConfig
from conch_dna.training.losses import kd_loss
from conch_dna.training.true_kd import make_kd_step, multiplier_tree, train_kd

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tests.conftest import Hooks


def warm_student(kit):
    """The kit student with LoRA whose lora_b is not zero (at zero, lora_a gets no gradient at all)."""
    mx.random.seed(0)
    model, tokenizer = load_model(kit["student"])
    apply_lora(model, 16, 8, 20.0, 0.0)
    model.update({k: v for k, v in model.trainable_parameters().items()})
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.load_weights([(name, mx.random.normal(value.shape) * 0.01)], strict=False)
    model.train()
    return model, tokenizer


def examples(tokenizer, n=8, k=8, seed=3):
    rng = np.random.default_rng(seed)
    out = []
    for chat in corpus.dialogues(n, seed=seed):
        tokens, offset = encode_chat(tokenizer, chat)
        logits = rng.normal(size=(len(tokens) - offset, 64))
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        ids = np.argsort(-logp, axis=1)[:, :k]
        out.append(KDExample(np.array(tokens, np.int32), offset, ids.astype(np.int32),
                             np.take_along_axis(logp, ids, 1).astype(np.float32)))
    return out


def params(model) -> dict[str, np.ndarray]:
    return {name: np.array(v) for name, v in tree_flatten(model.trainable_parameters())}


def test_one_step_scales_each_groups_adam_step_as_numpy_says(kit):
    model, tokenizer = warm_student(kit)
    config = KDConfig(top_k=8, hidden_weight=0.0)
    batch = collate(examples(tokenizer)[:4], 256)
    patterns = {"*lora_a": 0.5, "model.layers.1.*": 0.0, "model.layers.1.mlp.*": 2.0}
    before = params(model)
    _, grads = nn.value_and_grad(model, lambda m, *b: kd_loss(m, *b, temperature=2.0, alpha=0.7))(model, *batch)
    grads = {name: np.array(g) for name, g in tree_flatten(grads)}

    step, state = make_kd_step(model, optim.Adam(learning_rate=1e-2), config, multiplier_tree(model, patterns))
    mx.eval(state, step(*batch))
    after = params(model)

    def multiplier(name):  # the last matching pattern wins
        if name.startswith("model.layers.1.mlp."):
            return 2.0
        if name.startswith("model.layers.1."):
            return 0.0
        return 0.5 if name.endswith("lora_a") else 1.0

    for name, p in before.items():
        g = grads[name].astype(np.float64)
        adam = 1e-2 * 0.1 * g / (np.sqrt(0.001 * g * g) + 1e-8)  # mlx Adam's first step, no bias correction
        expected = p - multiplier(name) * adam
        assert np.allclose(after[name], expected, atol=1e-6, rtol=1e-4), name
        if multiplier(name) == 0.0:
            assert (after[name] == p).all(), name
    assert any(np.abs(after[n] - before[n]).max() > 1e-4 for n in after if multiplier(n) == 2.0)


def test_a_frozen_group_stays_bit_identical_and_a_stage_switches_at_its_step(kit):
    model, tokenizer = warm_student(kit)
    config = KDConfig(top_k=8, hidden_weight=0.0, batch_size=2, num_iters=6, learning_rate=1e-2, steps_per_report=1,
                      lr_multipliers={"model.layers.0.*": 0},
                      stages=[{"steps": 3, "multipliers": {"*": 0}}])
    start = params(model)
    seen = []
    train_kd(model, examples(tokenizer), config, {}, callbacks=Hooks(on_report=lambda r: seen.append(params(model))))
    assert len(seen) == 6
    for step, snapshot in enumerate(seen, 1):
        frozen_all = step <= 3
        for name, value in snapshot.items():
            if frozen_all or name.startswith("model.layers.0."):
                assert (value == start[name]).all(), (step, name)
    moved = [n for n in seen[3] if not (seen[3][n] == start[n]).all()]
    assert moved and all(not n.startswith("model.layers.0.") for n in moved)


def test_a_pattern_that_matches_nothing_is_an_error_naming_it(kit):
    model, tokenizer = warm_student(kit)
    config = KDConfig(top_k=8, hidden_weight=0.0, num_iters=2, lr_multipliers={"model.layer.0.*": 0})
    with pytest.raises(ValueError, match=r"pattern 'model.layer.0.\*' matches no trainable parameter"):
        train_kd(model, examples(tokenizer), config, {})
    assert multiplier_tree(model, {"*": 1.0}) is None


def test_multipliers_and_stages_are_checked_and_take_effect_in_order():
    config = KDConfig(lr_multipliers={"a*": 0.5}, stages=[{"steps": 2, "multipliers": {"b*": 0}},
                                                          {"steps": 1, "multipliers": {"a*": 2}}])
    assert [config.multipliers_at(s) for s in (1, 2, 3, 4)] == [
        {"a*": 0.5, "b*": 0.0}, {"a*": 0.5, "b*": 0.0}, {"a*": 2.0}, {"a*": 0.5}]
    for bad, message in [({"lr_multipliers": {"x": -1}}, r"lr_multipliers\['x'\] must be a number in \[0, 100\]"),
                         ({"stages": [{"steps": 0}]}, r"stages\[0\].steps must be an integer >= 1"),
                         ({"stages": [{"steps": 2, "lr": 1}]}, r"stages\[0\] must be"),
                         ({"stages": {"steps": 2}}, "stages must be a list")]:
        with pytest.raises(ValueError, match=message):
            KDConfig(**bad)

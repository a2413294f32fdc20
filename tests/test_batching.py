"""Batched serving: calls of every domain and version decode together, each exactly as it would alone.

Real kit student, real mlx-lm caches and samplers, real promoted versions (written by another
process, as `conch` does). "Alone" is the same call with nothing else running.
"""

import gc
import json
import os
import threading
import time
import weakref
from contextlib import contextmanager

from conch_dna.settings.config import ConfigError, load_config
from conch_dna.system.domains import DOMAINS

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.tuner.lora import LoRALinear
from test_neurons import make_home, registry_and_a_copy_of_v0001

from neurons import NeuronRegistry
from neurons.batching import EngineClosed, Finish
from neurons.multi_lora import Adapter, RowAdapters

PROMPTS = ["Plan how to send the email.", "Why does ice float?", "Fix the failing test.", "hi"]


def promote_random_versions(home, plan: dict[str, int], seed: int = 11) -> None:
    """Promote `plan[domain]` versions of random LoRA weights (as a retrain would write them)."""
    from conch_dna.kit import STUDENT_PATH
    from conch_dna.models.adapters import adapter_weights, apply_lora, save_adapter
    from conch_dna.models.loading import load_model
    from conch_dna.models.versions import promote

    model, _ = load_model(STUDENT_PATH)
    config = {"model": STUDENT_PATH, **apply_lora(model, 16, 8, 20.0, 0.0)}
    shapes = {k: v.shape for k, v in adapter_weights(model).items()}
    rng = np.random.default_rng(seed)
    for domain, count in plan.items():
        for i in range(count):
            weights = {k: mx.array(rng.standard_normal(s).astype(np.float32) * (0.05 if k.endswith("lora_b") else 0.3))
                       for k, s in shapes.items()}
            promote(home, domain, save_adapter(home.parent / f"cand-{domain}-{i}", weights, config), "random")


@pytest.fixture(scope="module")
def versions_home(tmp_path_factory):
    """Every domain has a promoted version; task has two (v0002 serves, v0001 can be pinned)."""
    home = make_home(tmp_path_factory.mktemp("batching"))
    promote_random_versions(home, {"task": 2, **{d: 1 for d in DOMAINS if d != "task"}})
    return home


def with_batch_size(home, size):
    text = (home / "config.toml").read_text().split("[neurons]")[0]
    (home / "config.toml").write_text(f"{text}[neurons]\nmax_batch_size = {size}\n")
    return home


@contextmanager
def serving(home, batch_size, watch=False, **kwargs):
    """A registry of the home with max_batch_size = batch_size, closed at the end."""
    registry = NeuronRegistry(with_batch_size(home, batch_size), watch=watch, **kwargs)
    try:
        yield registry
    finally:
        registry.close()


def alone(neuron, prompt, **kwargs):
    """The call with nothing else running in the registry."""
    assert neuron.registry.stats()["running"] == 0
    return neuron.generate(prompt, **kwargs)


def test_a_mixed_batch_of_every_domain_and_a_pinned_old_version_equals_each_call_alone(versions_home):
    with serving(versions_home, 16) as registry:
        assert registry.next_version("task") == "v0002"
        with registry.pinned("task", version="v0001") as old_task:
            neurons = [registry.get(d) for d in DOMAINS] + [old_task]
            expected = {(i, p): alone(n, p, max_tokens=10) for i, n in enumerate(neurons) for p in PROMPTS}
            calls = {(i, p): n.submit(p, max_tokens=10) for i, n in enumerate(neurons) for p in PROMPTS}
            got = {key: "".join(call) for key, call in calls.items()}
        assert got == expected
        assert registry.stats()["peak_running"] == 16  # they did decode together
        task = DOMAINS.index("task")
        assert {c.version for (i, _), c in calls.items() if i == task} == {"v0002"}
        assert {c.version for (i, _), c in calls.items() if i == len(DOMAINS)} == {"v0001"}
        # the versions really differ, so a row on the wrong adapter would show
        assert len({expected[(i, PROMPTS[0])] for i in range(len(neurons))}) == len(neurons)


def test_a_call_joins_a_running_batch_and_leaves_it_without_waiting_for_the_others(versions_home):
    with serving(versions_home, 8) as registry:
        long_alone = alone(registry.get("debug"), PROMPTS[1], max_tokens=48)
        short_alone = alone(registry.get("task"), PROMPTS[0], max_tokens=3)
        long_call = registry.get("debug").submit(PROMPTS[1], max_tokens=48)
        chunks = iter(long_call)
        head = next(chunks)  # the long call is decoding
        short_call = registry.get("task").submit(PROMPTS[0], max_tokens=3)
        assert "".join(short_call) == short_alone
        assert short_call.finish_reason is Finish.LENGTH and short_call.completion_tokens == 3
        assert long_call.finish_reason is None  # still running when the short one left
        assert head + "".join(chunks) == long_alone
        assert registry.stats()["peak_running"] == 2


def test_each_call_keeps_its_own_max_tokens_stop_strings_and_logits_processors(versions_home):
    with serving(versions_home, 8) as registry:
        task, debug = registry.get("task"), registry.get("debug")
        full = alone(debug, PROMPTS[2], max_tokens=16)
        stop = full[4:7]
        forced = registry.tokenizer.encode("e", add_special_tokens=False)[-1]
        bias = make_logits_processors(logit_bias={forced: 1000.0})
        calls = [task.submit(PROMPTS[0], max_tokens=2), debug.submit(PROMPTS[2], max_tokens=16, stop=[stop]),
                 task.submit(PROMPTS[1], max_tokens=5, logits_processors=bias),
                 debug.submit(PROMPTS[2], max_tokens=16)]
        broken = task.submit(PROMPTS[0], max_tokens=8, logits_processors=[lambda tokens, logits: logits[:, :-1] / 0])
        with pytest.raises(ValueError, match="logits processor returned"):  # in its own caller only
            "".join(broken)
        texts = ["".join(c) for c in calls]
        assert calls[0].completion_tokens == 2 and calls[0].finish_reason is Finish.LENGTH
        assert texts[1] == full[:full.find(stop)] and calls[1].finish_reason is Finish.STOP
        assert texts[2] == registry.tokenizer.decode([forced] * 5)  # only its own row is biased
        assert texts[3] == full and calls[3].finish_reason is Finish.LENGTH


def test_sampling_with_a_temperature_samples_and_greedy_rows_beside_it_do_not(versions_home):
    with serving(versions_home, 8) as registry:
        task = registry.get("task")
        greedy = alone(task, PROMPTS[0], max_tokens=12)
        mx.random.seed(0)
        sampled = [task.submit(PROMPTS[0], max_tokens=12, temperature=5.0, top_k=50) for _ in range(4)]
        beside = task.submit(PROMPTS[0], max_tokens=12)
        texts = {"".join(c) for c in sampled}
        assert "".join(beside) == greedy
        assert len(texts - {greedy}) >= 3  # at temperature 5 the sampled answers differ
        with pytest.raises(TypeError, match="unknown generation setting 'temprature'"):
            task.generate(PROMPTS[0], temprature=0.5)
        with pytest.raises(ValueError, match="max_tokens must be at least 1"):
            task.generate(PROMPTS[0], max_tokens=0)
        with pytest.raises(ValueError, match="need a temperature above 0"):
            task.generate(PROMPTS[0], top_p=0.9)


def wait_until(condition, what: str, limit_s: float = 120.0):
    """Wait for the engine's progress (it steps on its own thread); fail after a generous limit."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["close", "drop", "cancel"])
def test_a_caller_that_stops_reading_frees_its_row(versions_home, how):
    with serving(versions_home, 8) as registry:
        forced = make_logits_processors(logit_bias={registry.tokenizer.encode("e", add_special_tokens=False)[-1]: 1e3})
        task = registry.get("task")
        if how == "cancel":
            call = task.submit(PROMPTS[1], max_tokens=400, logits_processors=forced)
            next(iter(call))
            call.cancel()
            wait_until(lambda: call.finish_reason is Finish.CANCELLED, "the cancelled call to end")
        else:
            stream = task.stream(PROMPTS[1], max_tokens=400, logits_processors=forced)
            next(stream)
            if how == "close":
                stream.close()
            else:
                del stream
                gc.collect()
        wait_until(lambda: registry.stats()["running"] == 0, "the row to be freed")
        assert registry.stats()["tokens_generated"] < 400  # it never ran to its max_tokens
        assert task.generate(PROMPTS[0], max_tokens=2)  # and the registry serves on


def test_the_batch_never_grows_past_max_batch_size_and_every_call_is_served(versions_home):
    with serving(versions_home, 2) as registry:
        expected = alone(registry.get("debug"), PROMPTS[3], max_tokens=6)
        outputs, threads = [], []
        for _ in range(6):
            threads.append(threading.Thread(target=lambda: outputs.append(
                registry.get("debug").generate(PROMPTS[3], max_tokens=6))))
            threads[-1].start()
        for t in threads:
            t.join()
        stats = registry.stats()
        assert outputs == [expected] * 6
        assert stats["peak_running"] == 2 and stats["calls_served"] == 7
        assert stats["tokens_generated"] == 7 * 6 and stats["queued"] == 0


def test_an_old_version_is_freed_once_no_call_or_pin_holds_it(tmp_path):
    from conch_dna.models.versions import promote

    home, registry, copy = registry_and_a_copy_of_v0001(tmp_path)
    try:
        old = weakref.ref(registry.serving("task")[1])
        with registry.pinned("task") as pinned:
            promote(home, "task", copy, "the same weights again")
            registry.refresh("task")
            assert registry.next_version("task") == "v0002"
            call = pinned.submit(PROMPTS[0], max_tokens=4)
            assert call.version == "v0001" and "".join(call)
            del call
        assert registry.get("task").generate(PROMPTS[0], max_tokens=2)  # the batch moved on
        del pinned
        gc.collect()
        assert old() is None
    finally:
        registry.close()


def test_calls_waiting_or_running_when_the_registry_closes_get_an_error(versions_home):
    registry = NeuronRegistry(with_batch_size(versions_home, 8), watch=False)
    calls = [registry.get("task").submit(PROMPTS[1], max_tokens=400) for _ in range(3)]
    next(iter(calls[0]))
    registry.close()
    for call in calls:
        with pytest.raises(EngineClosed):
            "".join(call)
    with pytest.raises(EngineClosed, match="closed"):
        registry.get("task").generate("hi")


def test_a_multi_lora_layer_gives_each_row_what_its_own_lora_layer_gives(student):
    import mlx.nn as nn

    rng = np.random.default_rng(3)
    layers = [LoRALinear(8, 6, r=2, scale=2.0) for _ in range(3)]
    for layer in layers:
        layer.linear = layers[0].linear  # shared base weights
        layer.lora_a = mx.array(rng.standard_normal((8, 2)).astype(np.float32))
        layer.lora_b = mx.array(rng.standard_normal((2, 6)).astype(np.float32))
    model = nn.Module()
    model.proj = LoRALinear(8, 6, r=2, scale=2.0)
    model.proj.linear = layers[0].linear
    rows = RowAdapters(model)
    adapters = [Adapter(f"v{i}", {"proj.lora_a": np.array(lay.lora_a), "proj.lora_b": np.array(lay.lora_b)})
                for i, lay in enumerate(layers)]
    x = mx.array(rng.standard_normal((4, 3, 8)).astype(np.float32))
    order = [2, 0, 1, 2]
    rows.hold(adapters)
    rows.select([adapters[i] for i in order])
    out = model.proj(x)
    for row, i in enumerate(order):
        assert np.allclose(np.array(out[row]), np.array(layers[i](x[row:row + 1])[0]), atol=1e-5)
    rows.hold(adapters[:1])  # a smaller set of adapters: the others are let go
    assert [a.version for a in rows.stacked] == ["v0"]
    with pytest.raises(TypeError, match="no LoRA layers"):
        RowAdapters(nn.Module())


def test_neurons_settings_are_validated(tmp_path):
    home = make_home(tmp_path)
    with_batch_size(home, 0)
    with pytest.raises(ConfigError, match="neurons.max_batch_size"):
        load_config(home)
    with_batch_size(home, 4)
    assert load_config(home).neurons.max_batch_size == 4


def test_conch_doctor_shows_each_serving_registry_and_forgets_it_when_it_closes(versions_home, tmp_path):
    from conch_dna.lifecycle.doctor import check_neurons

    config = load_config(versions_home)
    with serving(versions_home, 8, watch=True, poll_seconds=0.05) as registry:
        "".join(registry.get("task").submit(PROMPTS[0], max_tokens=5))
        wait_until(lambda: registry.stats_path.exists() and
                   '"tokens_generated": 5' in registry.stats_path.read_text(), "the registry's figures")
        assert oct(registry.stats_path.stat().st_mode & 0o777) == "0o600"
        check = check_neurons(versions_home, config)
        [figures] = check.details["registries"]
        assert figures["pid"] == os.getpid() and figures["calls_served"] == 1 and figures["max_batch_size"] == 8
        assert f"pid {os.getpid()}: 0 running, 0 queued" in check.value
        dead = registry.stats_path.with_name("999999999.json")  # a registry that died without closing
        dead.write_text(json.dumps({**figures, "pid": 999999999}))
        assert len(check_neurons(versions_home, config).details["registries"]) == 1
        dead.unlink()
    assert not registry.stats_path.exists()
    assert check_neurons(versions_home, config).value.startswith("no registry serving")

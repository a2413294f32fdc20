"""The neuron registry: threads calling while another process promotes versions; a corrupt version."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from conch_dna.kit import STUDENT_PATH
from conch_dna.models.versions import read_manifest
from conch_dna.system.domains import SYSTEM_PROMPTS

import pytest
from mlx_lm import generate, load

from neurons import NeuronRegistry

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Plan how to send the email."

PROMOTER = """
import sys, time
from pathlib import Path
import mlx.core as mx
from conch_dna.models.adapters import adapter_weights, apply_lora, save_adapter
from conch_dna.models.loading import load_model
from conch_dna.models.versions import promote
home, student, n, pause = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
domain, seed = sys.argv[5], int(sys.argv[6])
model, _ = load_model(student)
config = {"model": student, **apply_lora(model, 16, 8, 20.0, 0.0)}
shapes = {k: v.shape for k, v in adapter_weights(model).items()}
for i in range(n):
    mx.random.seed(seed + i)
    weights = {k: mx.random.normal(s) * (0.05 if k.endswith("lora_b") else 0.3) for k, s in shapes.items()}
    cand = home / f"cand{i}"
    save_adapter(cand, weights, config)
    promote(home, domain, cand, f"round {i}")
    time.sleep(pause)
"""


def make_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'student = "{STUDENT_PATH}"\n[kd]\nlora_layers = 16\nlora_rank = 8\n')
    return home


def promote_versions(home, n, pause, domain="task", seed=1000):
    return subprocess.Popen([sys.executable, "-c", PROMOTER, str(home), STUDENT_PATH, str(n), str(pause),
                             domain, str(seed)], env={**os.environ, "PYTHONPATH": str(ROOT)})


def reference_answer(home, domain, version, prompt=PROMPT):
    """What mlx_lm itself generates with the version's adapter, given the domain's system prompt."""
    path = None if version == "base" else str(home / "adapters_kd" / domain / version)
    model, tokenizer = load(STUDENT_PATH, adapter_path=path)
    chat = [{"role": "system", "content": SYSTEM_PROMPTS[domain]}, {"role": "user", "content": prompt}]
    return generate(model, tokenizer, tokenizer.apply_chat_template(chat, add_generation_prompt=True), max_tokens=6)


def test_threads_keep_calling_while_another_process_promotes_20_versions(tmp_path):
    home = make_home(tmp_path)
    registry = NeuronRegistry(home, poll_seconds=0.25)
    assert registry.get("task").version == "base"
    served, failures, done = [], [], threading.Event()

    def agent():
        while not done.is_set():
            try:
                neuron = registry.get("task")
                out = neuron.generate(PROMPT, max_tokens=6)
                served.append((neuron.served_version, out))
            except Exception as exc:  # noqa: BLE001
                failures.append(exc)

    threads = [threading.Thread(target=agent) for _ in range(3)]
    for t in threads:
        t.start()
    producer = promote_versions(home, 20, 0.5)
    try:
        assert producer.wait(timeout=240) == 0
        deadline = time.monotonic() + 60
        while registry.get("task").version != "v0020" and time.monotonic() < deadline:
            time.sleep(0.05)
        # a pinned neuron keeps its version across a swap; a rollback arrives like any version
        from conch_dna.models.versions import rollback

        with registry.pinned("task") as pinned:
            rollback(home, "task", to="v0005")
            deadline = time.monotonic() + 60
            while registry.get("task").version != "v0005" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert registry.get("task").version == "v0005"
            pinned_out = pinned.generate(PROMPT, max_tokens=6)
            assert pinned.served_version == "v0020"
            served.append(("v0020", pinned_out))
    finally:
        done.set()
        for t in threads:
            t.join()
        registry.close()
    assert not failures, failures[:3]

    # swaps followed their manifest changes (the lag itself is a figure of bench/swap.py, not a test)
    history = {h["version"]: h["at"] for h in read_manifest(home, "task")["history"]}
    lags = {v: registry.swapped_at[("task", v)] - at for v, at in history.items() if ("task", v) in registry.swapped_at}
    assert len(lags) >= 5 and min(lags.values()) >= 0, lags

    # every output equals what its version produces alone (greedy decoding)
    by_version: dict[str, set] = {}
    for version, out in served:
        by_version.setdefault(version, set()).add(out)
    assert len(by_version) >= 5
    for version, outputs in by_version.items():
        # a string prompt is served as it is trained: with the domain's system prompt
        assert outputs == {reference_answer(home, "task", version)}, version


def test_a_corrupt_version_is_refused_and_the_old_one_keeps_serving(tmp_path):
    home = make_home(tmp_path)
    assert promote_versions(home, 1, 0).wait(timeout=120) == 0
    registry = NeuronRegistry(home, poll_seconds=0.2)
    try:
        neuron = registry.get("task")
        assert neuron.version == "v0001"
        before = neuron.generate(PROMPT, max_tokens=6)
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "adapters.safetensors").write_bytes(b"\x00" * 64)
        v1 = home / "adapters_kd" / "task" / "v0001"
        (bad / "adapter_config.json").write_text((v1 / "adapter_config.json").read_text())
        from conch_dna.models.versions import promote

        promote(home, "task", bad, "a broken candidate")
        deadline = time.monotonic() + 60
        while ("task", "v0002") not in registry.refused and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "cannot read adapters.safetensors" in registry.refused[("task", "v0002")]
        assert neuron.version == "v0001" and neuron.generate(PROMPT, max_tokens=6) == before
        with registry.pinned("task") as pinned:
            assert pinned.version == "v0001"
    finally:
        registry.close()


def test_unknown_domain_lists_the_known_ones(tmp_path):
    registry = NeuronRegistry(make_home(tmp_path), watch=False)
    with pytest.raises(ValueError, match="known domains: thinking, task"):
        registry.get("dreaming")
    assert json.dumps(registry.get("memory").version) == '"base"'


def test_unknown_domain_fails_on_its_name_before_any_model_loads(tmp_path, monkeypatch):
    from conch_dna.system.domains import UnknownDomainError

    import neurons

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('student = "/nowhere/student"\n')  # loading it would fail otherwise
    monkeypatch.setenv("CONCH_HOME", str(home))
    monkeypatch.setattr(neurons, "_registry", None)
    with pytest.raises(UnknownDomainError, match="thinkng"):
        neurons.get("thinkng")
    with pytest.raises(UnknownDomainError):
        neurons.pinned("../etc")
    assert neurons._registry is None


def registry_and_a_copy_of_v0001(tmp_path):
    """A home with one promoted task version, a registry serving it, and a copy of it to spoil."""
    import shutil

    home = make_home(tmp_path)
    assert promote_versions(home, 1, 0).wait(timeout=120) == 0
    copy = tmp_path / "copy"
    shutil.copytree(home / "adapters_kd" / "task" / "v0001", copy)
    return home, NeuronRegistry(home, watch=False), copy


def test_a_version_trained_with_another_lora_scale_is_refused(tmp_path):
    """Same shapes, another scale: the weights fit, but served at our scale they would answer wrong."""
    from conch_dna.models.versions import promote

    home, registry, other = registry_and_a_copy_of_v0001(tmp_path)
    try:
        config = json.loads((other / "adapter_config.json").read_text())
        config["lora_parameters"]["scale"] = 10.0
        (other / "adapter_config.json").write_text(json.dumps(config))
        promote(home, "task", other, "trained at scale 10")
        registry.refresh("task")
        assert "trained with LoRA (layers, rank, scale) (2, 8, 10.0)" in registry.refused[("task", "v0002")]
        assert registry.get("task").version == "v0001"
    finally:
        registry.close()


def test_interleaved_calls_of_two_domains_each_get_their_own_version(tmp_path):
    home = make_home(tmp_path)
    assert promote_versions(home, 1, 0, "task", 7).wait(timeout=120) == 0
    assert promote_versions(home, 1, 0, "debug", 99).wait(timeout=120) == 0
    registry = NeuronRegistry(home, watch=False)
    answers, failures = {"task": set(), "debug": set()}, []

    def agent(order):
        try:
            for domain in order * 3:
                answers[domain].add(registry.get(domain).generate(PROMPT, max_tokens=6))
        except Exception as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=agent, args=(o,)) for o in (["task", "debug"], ["debug", "task"])]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        registry.close()
    assert not failures, failures
    assert answers == {"task": {reference_answer(home, "task", "v0001")},
                       "debug": {reference_answer(home, "debug", "v0001")}}
    assert answers["task"] != answers["debug"]  # the two versions really differ


def _broken(version_dir, how):
    """Break a copy of a good version in one way the registry must refuse."""
    from safetensors.numpy import load_file, save_file

    path = version_dir / "adapters.safetensors"
    weights = load_file(str(path))
    name = sorted(weights)[0]
    if how == "nan":
        weights[name] = weights[name].copy()
        weights[name].flat[0] = float("nan")
    elif how == "shape":
        weights[name] = weights[name][:-1]
    elif how == "dtype":
        weights[name] = weights[name].astype("float16")
    elif how == "link":
        outside = version_dir.parent / "outside.safetensors"
        path.rename(outside)
        path.symlink_to(outside)
        return "is a link"
    save_file(weights, str(path))
    return {"nan": "NaN or infinity", "shape": "has shape", "dtype": "is float16"}[how]


@pytest.mark.parametrize("how", ["nan", "shape", "dtype", "link"])
def test_a_version_that_does_not_fit_is_refused_and_the_old_one_keeps_serving(tmp_path, how):
    from conch_dna.models.versions import promote

    home, registry, copy = registry_and_a_copy_of_v0001(tmp_path)
    try:
        words = _broken(copy, how)
        promote(home, "task", copy, f"broken: {how}")
        registry.refresh("task")
        assert words in registry.refused[("task", "v0002")]
        assert registry.serving("task")[0] == "v0001"
    finally:
        registry.close()


@pytest.mark.parametrize("manifest, words", [
    (b"{not json", "not readable JSON"),
    (b'["v0001"]', "a JSON object"),
    (b'{"history": []}', "'current' must name a version"),
    (b'{"current": 7, "history": []}', "got 7"),
    (b'{"current": "../../../etc", "history": []}', "got '../../../etc'"),
    (b'{"current": "v0001", "history": 3}', "'history' must be a list"),
])
def test_a_broken_manifest_keeps_the_old_version_serving_and_blocks_nothing(tmp_path, caplog, manifest, words):
    from conch_dna.models.versions import ManifestError, current_version, rollback

    home = make_home(tmp_path)
    assert promote_versions(home, 1, 0).wait(timeout=120) == 0
    registry = NeuronRegistry(home, poll_seconds=0.05)
    path = home / "adapters_kd" / "task" / "manifest.json"
    try:
        # written whole: a reader between truncate and write would see an empty file, another error
        (tmp_path / "broken.json").write_bytes(manifest)
        os.replace(tmp_path / "broken.json", path)
        deadline = time.monotonic() + 120
        while "task" not in registry.broken_manifests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert words in registry.broken_manifests["task"]
        for _ in range(5):  # every poll sees it again: it is logged once, not once per poll
            registry.refresh()
        assert sum(words in r.getMessage() for r in caplog.records) == 1
        assert registry.serving("task")[0] == "v0001"
        # a registry started now serves the domain's base and every other domain as before
        fresh = NeuronRegistry(home, watch=False)
        try:
            assert fresh.get("task").version == "base" and fresh.get("debug").version == "base"
            assert fresh.get("task").generate(PROMPT, max_tokens=2)
        finally:
            fresh.close()
        with pytest.raises(ManifestError, match=words.replace("[", r"\[")):
            current_version(home, "task")
        assert rollback(home, "task", to="v0001") == "v0001"  # the repair
        assert current_version(home, "task") == "v0001"
    finally:
        registry.close()

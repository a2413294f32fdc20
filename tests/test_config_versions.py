"""config.toml validation and adapter versions / manifest switching on real files."""

import json
import os
from pathlib import Path

from conch_dna.models.versions import (
    current_adapter_path,
    current_version,
    list_versions,
    promote,
    read_manifest,
    rollback,
)
from conch_dna.settings.config import ConfigError, load_config, parse_config

import pytest

from tests.conftest import Hooks


def test_defaults_and_overrides(tmp_path):
    assert load_config(tmp_path).retrain_threshold == 32
    (tmp_path / "config.toml").write_text(
        'teacher = "t"\nretrain_threshold = 5\n[kd]\nnum_iters = 7\n[domain.debug]\nretrain_threshold = 2\n')
    c = load_config(tmp_path)
    assert (c.threshold("debug"), c.threshold("task"), c.iters("task"), c.teacher) == (2, 5, 7, "t")
    assert c.kd_for("thinking").num_iters == 7


@pytest.mark.parametrize("text,message", [
    ("colour = 1", "colour: unknown key"),
    ("[kd]\nbogus = 1", "kd.bogus: unknown key"),
    ("[kd]\ntemperature = 50", "kd.temperature must be in [0.5, 10.0]"),
    ("retrain_threshold = -1", "retrain_threshold: Input should be greater than or equal to 1"),
    ("[domain.nope]\nretrain_threshold = 1", "domain.nope: not one of the configured domains"),
    ('domains = ["../x"]', "invalid domain name '../x'"),
    ("x = ", "not valid TOML"),
])
def test_bad_config_names_the_key(text, message):
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert message in str(err.value)


def candidate(tmp_path, name, payload=b"weights"):
    d = tmp_path / name
    d.mkdir()
    (d / "adapters.safetensors").write_bytes(payload)
    (d / "adapter_config.json").write_text("{}")
    return d


def test_promote_writes_immutable_versions_and_switches_the_manifest(tmp_path):
    home = tmp_path / "home"
    assert current_version(home, "task") is None and current_adapter_path(home, "task") is None
    assert promote(home, "task", candidate(tmp_path, "c1"), "first") == "v0001"
    assert promote(home, "task", candidate(tmp_path, "c2", b"two"), "better") == "v0002"
    assert list_versions(home, "task") == ["v0001", "v0002"]
    assert current_adapter_path(home, "task").name == "v0002"
    assert (current_adapter_path(home, "task") / "adapters.safetensors").read_bytes() == b"two"
    assert [h["reason"] for h in read_manifest(home, "task")["history"]] == ["first", "better"]

    assert rollback(home, "task") == "v0001" and current_version(home, "task") == "v0001"
    assert rollback(home, "task", to="v0002") == "v0002"
    with pytest.raises(ValueError, match="no version 'v0009'"):
        rollback(home, "task", to="v0009")
    with pytest.raises(ValueError, match="no version has been promoted"):
        rollback(home, "debug")
    manifest = json.loads((home / "adapters_kd" / "task" / "manifest.json").read_text())
    assert manifest["current"] == "v0002" and len(manifest["history"]) == 4


def test_gate_rules():
    from conch_dna.lifecycle.gate import decide
    from conch_dna.settings.config import Config

    c = Config(min_heldout=4)
    cur, better = {"kl": 1.0, "agreement": 0.8}, {"kl": 0.9, "agreement": 0.8}
    assert decide(cur, better, 10, c, "task", False)[0] is True
    assert decide(cur, {"kl": 0.99, "agreement": 0.8}, 10, c, "task", False) == (
        False, "held-out KL 1.0000 -> 0.9900 (-1.0%), top-1 80.0% -> 80.0%: KL must fall by at least 2%")
    assert "top-1 agreement fell by more than 1.0%" in decide(cur, {"kl": 0.5, "agreement": 0.7}, 10, c, "task",
                                                                 False)[1]
    # A 3-point top-1 drop with KL down 12%: noise on 300 held-out tokens (tolerance 4.6 points),
    # a real loss on 20,000 (tolerance 1 point, the configured floor).
    small, large = {**cur, "tokens": 300}, {**cur, "tokens": 20_000}
    dropped = {"kl": 0.88, "agreement": 0.77}
    assert decide(small, dropped, 10, c, "task", False)[0] is True
    assert decide(large, dropped, 10, c, "task", False) == (
        False, "held-out KL 1.0000 -> 0.8800 (-12.0%), top-1 80.0% -> 77.0%: top-1 agreement fell by more than 1.0%")
    assert "fell by more than 4.6%" in decide(small, {"kl": 0.5, "agreement": 0.7}, 10, c, "task", False)[1]
    ok, why = decide(cur, better, 3, c, "task", False)
    assert not ok and "only 3 held-out traces" in why and "--force" in why
    assert decide(cur, better, 3, c, "task", True)[0] is True
    established = {"before": {"kl": 0.2, "tokens": 500}, "after": {"kl": 0.3, "tokens": 500}}
    ok, why = decide(cur, better, 10, c, "task", False, established)
    assert not ok and "KL rose 0.2000 -> 0.3000" in why
    established["after"]["kl"] = 0.203  # within the margin
    assert decide(cur, better, 10, c, "task", False, established)[0] is True


def test_gate_never_passes_a_non_finite_metric_and_never_blocks_for_ever_on_one():
    from conch_dna.lifecycle.gate import decide
    from conch_dna.settings.config import Config

    c = Config(min_heldout=4)
    good = {"kl": 0.9, "agreement": 0.8}
    for bad in (float("nan"), float("inf")):
        ok, why = decide({"kl": 1.0, "agreement": 0.8}, {"kl": bad, "agreement": 0.8}, 10, c, "task", False)
        assert not ok and "candidate's held-out metrics are not finite" in why
        ok, why = decide({"kl": bad, "agreement": 0.8}, good, 10, c, "task", False)
        assert ok and "current version's held-out metrics are not finite" in why
        established = {"before": {"kl": 0.2, "tokens": 500}, "after": {"kl": bad, "tokens": 500}}
        assert not decide({"kl": 1.0, "agreement": 0.8}, good, 10, c, "task", False, established)[0]


def test_gate_edges():
    from conch_dna.lifecycle.gate import decide
    from conch_dna.settings.config import Config, DomainSettings

    half = Config(min_heldout=0, promote_margin=0.5)
    cur = {"kl": 1.0, "agreement": 0.8}
    assert decide(cur, {"kl": 0.5, "agreement": 0.8}, 10, half, "task", False)[0] is True  # exactly the margin
    assert decide(cur, {"kl": 0.5001, "agreement": 0.8}, 10, half, "task", False)[0] is False
    # a current KL of 0 cannot be beaten: no division by zero, no promotion
    ok, why = decide({"kl": 0.0, "agreement": 1.0}, {"kl": 0.0, "agreement": 1.0}, 10, Config(), "task", False)
    assert not ok and "KL must fall by at least 2%" in why
    # min_heldout = 0 and no held-out traces at all: no metrics, promoted only when forced
    assert decide(None, None, 0, half, "task", False) == (False, "no held-out metrics")
    assert decide(None, None, 0, half, "task", True) == (True, "forced without held-out metrics")
    assert decide(cur, None, 10, half, "task", False) == (False, "no held-out metrics")  # one side missing
    assert decide(None, cur, 10, half, "task", False) == (False, "no held-out metrics")
    # the gain is relative: 2.0 -> 1.0 is a 50% fall
    ok, why = decide({"kl": 2.0, "agreement": 0.8}, {"kl": 1.0, "agreement": 0.8}, 10, half, "task", False)
    assert ok and "(-50.0%)" in why
    # top-1 may fall by exactly the allowed drop, not more
    drop = Config(min_heldout=0, max_agreement_drop=0.25)
    top1 = {"kl": 1.0, "agreement": 0.75}
    assert decide(top1, {"kl": 0.5, "agreement": 0.5}, 10, drop, "task", False)[0] is True
    assert decide(top1, {"kl": 0.5, "agreement": 0.49}, 10, drop, "task", False)[0] is False
    # the established set may get worse by the margin itself, not more
    c = Config(min_heldout=0, promote_margin=0.1)
    better = {"kl": 0.5, "agreement": 0.8}
    edge = {"before": {"kl": 0.2, "tokens": 50}, "after": {"kl": 0.2 * 1.1, "tokens": 50}}
    assert decide(cur, better, 10, c, "task", False, edge)[0] is True
    edge["after"]["kl"] = 0.2 * 1.1 + 1e-6
    assert decide(cur, better, 10, c, "task", False, edge)[0] is False
    # a domain's own min_heldout, 0 included, rules over the top-level one
    per = Config(min_heldout=4, domain={"debug": DomainSettings(min_heldout=20),
                                        "memory": DomainSettings(min_heldout=0)})
    assert "the gate needs 20" in decide(cur, better, 10, per, "debug", False)[1]
    assert decide(cur, better, 10, per, "task", False)[0] is True
    assert decide(cur, better, 0, per, "memory", False)[0] is True
    assert "the gate needs 4" in decide(cur, better, 0, per, "task", False)[1]


def kit_home(tmp_path, kit, top: str, kd: str, traces: int, seed: int):
    """A home on the kit (LoRA rank 4 on 2 layers, no held-out minimum) with `task` traces recorded."""
    from conch_dna.kit import corpus
    from conch_dna.settings.config import parse_config
    from conch_dna.traces.ingest import record
    from conch_dna.traces.store import TraceStore

    home = tmp_path / "home"
    home.mkdir()
    config = parse_config(f'teacher = "{kit["teacher"]}"\nstudent = "{kit["student"]}"\nmin_heldout = 0\n{top}\n'
                          f"[kd]\n{kd}\nlora_rank = 4\nlora_layers = 2\n")
    store = TraceStore.for_home(home, config)
    for chat in corpus.dialogues(traces, seed=seed, domains=["task"]):
        record("task", chat, teacher=kit["teacher"], store=store)
    return home, config


def test_a_cycle_measures_current_on_the_current_version_not_the_bare_student(tmp_path, kit):
    """The gate's "current" metrics come from the warm start: the promoted version's weights."""
    from conch_dna.lifecycle.cycle import retrain_domain
    from conch_dna.models.adapters import adapter_weights, apply_lora, save_adapter
    from conch_dna.models.loading import load_model

    import mlx.core as mx

    home, config = kit_home(tmp_path, kit, "heldout_fraction = 0.3", "num_iters = 2", traces=20, seed=4)
    bare = retrain_domain(home, "task", config, force=True)
    assert bare.current_metrics and bare.current_metrics["tokens"] > 0
    model, _ = load_model(kit["student"])
    lora = apply_lora(model, 2, 4, 20.0, 0.0)
    mx.random.seed(3)
    weights = {k: mx.random.normal(v.shape) * 0.5 for k, v in adapter_weights(model).items()}
    save_adapter(tmp_path / "far", weights, {"model": kit["student"], **lora})
    promote(home, "task", tmp_path / "far", "a version far from the bare student")
    again = retrain_domain(home, "task", config, force=True)  # the same held-out traces, no new ones
    assert again.current_metrics["tokens"] == bare.current_metrics["tokens"]
    assert abs(again.current_metrics["kl"] - bare.current_metrics["kl"]) > 0.05


def test_a_log_prob_stored_as_minus_infinity_is_padding_not_a_nan(student):
    """float16 stores a log-prob below -65504 as -inf; training and evaluation must stay finite."""
    from conch_dna.training.data import KDExample, collate
    from conch_dna.training.evaluation import heldout_metrics

    import numpy as np

    ids = np.tile(np.arange(8, dtype=np.int32), (5, 1))
    lps = np.full((5, 8), -3.0, np.float16)
    lps[2, 5] = np.float16(-1e6)  # -inf once stored
    assert np.isneginf(lps[2, 5])
    example = KDExample(np.arange(12, dtype=np.int32) + 20, 7, ids, lps)
    *_, batch_lps = collate([example], 64)
    assert np.isfinite(np.array(batch_lps)).all()
    metrics = heldout_metrics(student[0], [example])
    assert all(np.isfinite([metrics.kl, metrics.ce, metrics.agreement]))


def test_a_prompt_longer_than_the_window_is_cut_from_the_left_and_its_answer_still_counts(student):
    from conch_dna.training.data import KDExample, collate
    from conch_dna.training.evaluation import heldout_metrics

    import numpy as np

    answer = np.array([40, 41, 42, 43, 44], np.int32)
    tokens = np.concatenate([np.arange(100, 200, dtype=np.int32), answer])  # a 100-token prompt
    rows = (np.tile(np.arange(8, dtype=np.int32), (5, 1)), np.full((5, 8), -3.0, np.float16))
    example = KDExample(tokens, 100, *rows)
    inputs, targets, mask, _, _ = collate([example], 16)
    assert inputs.shape[1] <= 16 and int(mask.sum().item()) == 5
    assert np.array(targets)[0][np.array(mask)[0] > 0].tolist() == answer.tolist()
    assert np.array(inputs)[0][int(np.argmax(np.array(mask)[0]))] == 199  # the prompt's last token predicts it
    assert heldout_metrics(student[0], [example], max_seq_length=16).tokens == 5


def test_one_cycle_per_domain_and_promotion_only_over_the_version_measured_against(tmp_path, kit):
    from conch_dna.lifecycle.cycle import retrain_domain
    from conch_dna.models.adapters import adapter_weights, apply_lora, save_adapter
    from conch_dna.models.loading import load_model
    from conch_dna.models.versions import DomainBusy, StaleCandidate, current_version, domain_lock, promote, rollback
    from conch_dna.settings.config import parse_config

    home = tmp_path / "home"
    home.mkdir()
    config = parse_config(f'teacher = "{kit["teacher"]}"\nstudent = "{kit["student"]}"\n')
    with domain_lock(home, "task"):
        result = retrain_domain(home, "task", config, force=True)
        assert result.status == "skipped" and "another retrain or rollback" in result.reason
        with pytest.raises(DomainBusy):
            rollback(home, "task")
    model, _ = load_model(kit["student"])
    adapter_config = {"model": kit["student"], **apply_lora(model, 2, 4, 20.0, 0.0)}
    for name in ("a", "b"):
        save_adapter(home / name, adapter_weights(model), adapter_config)
    assert promote(home, "task", home / "a", "first", expected_current=None) == "v0001"
    with pytest.raises(StaleCandidate, match="became v0001 while the candidate was measured against base"):
        promote(home, "task", home / "b", "measured against the bare student", expected_current=None)
    assert current_version(home, "task") == "v0001" and (home / "b").exists()


def test_a_cycle_whose_current_version_changed_mid_run_does_not_promote(tmp_path, kit):
    from conch_dna.lifecycle.cycle import retrain_domain
    from conch_dna.models.adapters import adapter_weights, apply_lora, save_adapter
    from conch_dna.models.loading import load_model
    from conch_dna.models.versions import current_version, promote

    home, config = kit_home(tmp_path, kit, "", "num_iters = 3\nsteps_per_report = 1\non_policy = 0", traces=12,
                            seed=3)
    model, _ = load_model(kit["student"])
    other = tmp_path / "other"
    save_adapter(other, adapter_weights(model), {"model": kit["student"], **apply_lora(model, 2, 4, 20.0, 0.0)})
    sneaked = []

    def promote_behind_its_back(report):  # another writer switches the manifest during training
        if not sneaked:
            sneaked.append(promote(home, "task", other, "sneaked in"))

    result = retrain_domain(home, "task", config, force=True, callbacks=Hooks(on_report=promote_behind_its_back))
    assert sneaked == ["v0001"]
    assert result.status == "rejected" and "became v0001 while the candidate was measured against base" in result.reason
    assert current_version(home, "task") == "v0001"


def test_each_kd_setting_is_defined_once_for_the_api_config_toml_and_the_flags():
    from dataclasses import fields

    from conch_dna.cli.trainer import parser
    from conch_dna.training.kd_config import KDConfig, kd_config_from_flags, setting_default

    flags = parser().parse_args(["--domain", "task"])
    toml = parse_config("").kd
    for f in fields(KDConfig):
        assert getattr(flags, f.name) == getattr(toml, f.name) == getattr(KDConfig(), f.name) == setting_default(f), \
            f.name
    # a table or a list of config.toml is JSON on the command line
    stages = '[{"steps": 5, "multipliers": {"*lora_a": 0}}]'
    flags = parser().parse_args(["--domain", "task", "--stages", stages, "--lr-multipliers", '{"*": 0.5}'])
    assert kd_config_from_flags(flags) == parse_config(
        '[kd]\nlr_multipliers = {"*" = 0.5}\nstages = [{steps = 5, multipliers = {"*lora_a" = 0}}]').kd
    with pytest.raises(SystemExit):
        parser().parse_args(["--domain", "task", "--stages", "five"])
    # every field is a [kd] key and a flag, and a value set either way lands in the same field
    assert parse_config("[kd]\nlora_dropout = 0.25\nseed = 3\n").kd == KDConfig(lora_dropout=0.25, seed=3)
    flags = parser().parse_args(["--domain", "task", "--lora-dropout", "0.25", "--seed", "3", "--iters", "9"])
    assert (flags.lora_dropout, flags.seed, flags.num_iters) == (0.25, 3, 9)


def test_changing_a_kd_default_in_its_one_place_changes_it_everywhere(tmp_path):
    """Edit the default of `temperature` in a copy of the package: the API, config.toml and the flags follow."""
    import shutil
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[1] / "conch_dna"
    shutil.copytree(src, tmp_path / "conch_dna", ignore=shutil.ignore_patterns("models", "__pycache__"))
    kd_config = tmp_path / "conch_dna" / "training" / "kd_config.py"
    text = kd_config.read_text()
    assert text.count("_setting(2.0, ") == 1
    kd_config.write_text(text.replace("_setting(2.0, ", "_setting(3.5, "))
    probe = ("from conch_dna.training.kd_config import KDConfig\nfrom conch_dna.settings.config import parse_config\n"
             "from conch_dna.cli.trainer import parser\n"
             "print(KDConfig().temperature, parse_config('').kd.temperature,"
             " parser().parse_args(['--all']).temperature)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3.5", "3.5", "3.5"]

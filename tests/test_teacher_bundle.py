"""Teacher-cache bundles: targets made in one home train a student in another without a teacher pass."""

import io
import json
import stat
import tarfile

from conch_dna.models.versions import current_adapter_path
from conch_dna.settings.config import ConfigError, parse_config
from conch_dna.traces.bundle import BUNDLE_FORMAT, BundleError, export_bundle, import_bundle
from conch_dna.traces.ingest import ingest_file
from conch_dna.traces.store import TraceStore
from conch_dna.training import distiller as distiller_module
from conch_dna.training.targets import teacher as teacher_module
from conch_dna.training.targets.teacher import TeacherCache
from conch_dna.training.targets.topk_codec import encode_topk

import numpy as np
import pytest

from tests.conftest import retrain, run_module
from tests.test_daemon import TEACHER_PATH, drop, teacher_traces, write_config


def home_with_traces(home, **extra):
    write_config(home, min_heldout=1000, **extra)  # --force promotes past the gate: this is about passes
    drop(home, "d.jsonl", teacher_traces("debug", 30, seed=8))
    ingest_file(TraceStore.for_home(home, parse_config((home / "config.toml").read_text())), home / "inbox" / "d.jsonl")


def test_a_bundle_moves_the_targets_and_the_other_home_retrains_without_the_teacher(tmp_path, monkeypatch):
    scoring, training = tmp_path / "scoring", tmp_path / "training"
    home_with_traces(scoring)
    assert str(retrain(scoring, "debug", iters=4, force=True).status) == "promoted"
    bundle = tmp_path / "targets.tar"
    out = run_module("conch_dna.cli", "teacher-cache", "export", str(bundle), "--json",
                     env={"CONCH_HOME": str(scoring)})
    exported = json.loads(out.stdout)
    assert exported["targets"] > 0 and exported["teacher"] == TEACHER_PATH
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600

    home_with_traces(training, measure_on_policy=False)
    out = run_module("conch_dna.cli", "teacher-cache", "import", str(bundle), "--json",
                     env={"CONCH_HOME": str(training)})
    imported = json.loads(out.stdout)
    assert imported["targets"] == exported["targets"] and imported["rejected"] == []
    again = run_module("conch_dna.cli", "teacher-cache", "import", str(bundle), env={"CONCH_HOME": str(training)})
    here = exported["targets"] + exported["hidden"] + exported["answers"]
    assert exported["hidden"] == exported["targets"]  # the default hidden-state loss: one per scored chat
    assert f"0 targets, 0 hidden states and 0 answers imported, {here} " \
        "already here" in again.stdout

    loaded = []
    original = distiller_module.load_model

    def load(model_id, *args, **kwargs):
        loaded.append(model_id)
        return original(model_id, *args, **kwargs)

    monkeypatch.setattr(distiller_module, "load_model", load)
    monkeypatch.setattr(teacher_module, "load_model", load)
    assert str(retrain(training, "debug", iters=4, force=True).status) == "promoted"
    assert TEACHER_PATH not in loaded and loaded
    report = json.loads((current_adapter_path(training, "debug") / "kd_metrics.json").read_text())
    assert report["teacher_forward_passes"] == 0 and report["own_answer_passes"] == 0
    assert report["heldout_after"]["tokens"] > 0 and "on_policy" not in report["heldout_after"]


def bundle_of(path, manifest, members: dict[str, bytes] | None = None, links: dict[str, str] | None = None):
    with tarfile.open(path, "w") as tar:
        for name, data in {"manifest.json": json.dumps(manifest).encode(), **(members or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, to in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, to
            tar.addfile(info)
    return path


def test_a_hostile_bundle_loses_nothing_and_writes_nothing_outside_the_cache(tmp_path):
    cache = TeacherCache(tmp_path / "cache")
    good = encode_topk(np.array([[3, 1]], np.int32), np.log(np.array([[0.6, 0.3]])))
    key = "ab" * 32
    bundle = bundle_of(tmp_path / "b.tar", {"format": BUNDLE_FORMAT, "teacher": "t"}, {
        f"targets/{key}.topk": good,
        "targets/../../evil.topk": good,
        f"targets/{'cd' * 32}.topk": b"CONCHTK1" + np.array([1, 2], np.uint32).tobytes() + b"\xff" * 12,
        f"targets/{'45' * 32}.topk": b"CONCHTK1" + b"\0" * 20,
        f"answers/{'ef' * 32}.json": b'{"answer": 7}',
        f"answers/{'01' * 32}.json": b'{"answer": "fine"}',
        f"hidden/{'67' * 32}.hidden": b"not safetensors",
    }, links={f"targets/{'23' * 32}.topk": "/etc/passwd"})
    summary = import_bundle(cache, bundle, "t")
    assert (summary.targets, summary.answers) == (1, 1)
    reasons = dict(line.split(": ", 1) for line in summary.rejected)
    assert reasons["targets/../../evil.topk"].startswith("not a target")
    assert "does not unpack" in reasons[f"targets/{'cd' * 32}.topk"]
    assert "width 0" in reasons[f"targets/{'45' * 32}.topk"]
    assert reasons[f"answers/{'ef' * 32}.json"].startswith("not an answer")
    assert reasons[f"targets/{'23' * 32}.topk"] == "not a plain file"
    assert reasons[f"hidden/{'67' * 32}.hidden"].startswith("not hidden states")
    assert cache.get(key)[0].tolist() == [[3, 1]] and cache.get_answer("01" * 32) == "fine"
    assert not (tmp_path / "evil.topk").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b.tar", "cache"]

    with pytest.raises(BundleError, match="made by teacher 't'; this home's teacher is 'other'"):
        import_bundle(cache, bundle, "other")
    with pytest.raises(BundleError, match="format is 'conch-teacher-cache/9'"):
        import_bundle(cache, bundle_of(tmp_path / "new.tar", {"format": "conch-teacher-cache/9", "teacher": "t"}), "t")
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(BundleError, match="not a teacher-cache bundle"):
        import_bundle(cache, tmp_path / "plain.txt", "t")


def test_export_packs_targets_of_an_older_cache(tmp_path):
    from safetensors.numpy import save_file

    cache = TeacherCache(tmp_path / "cache")
    legacy = cache.path("ab" * 32).with_suffix(".safetensors")
    legacy.parent.mkdir(mode=0o700)
    save_file({"ids": np.array([[4, 2]], np.int32), "logprobs": np.log(np.array([[0.7, 0.2]], np.float16))},
              str(legacy))
    cache.put_answer("cd" * 32, "an answer")
    states = cache.put_hidden("ef" * 32, np.ones((3, 2, 4), np.float32))
    summary = export_bundle(cache, tmp_path / "b.tar", "t")
    assert (summary.targets, summary.answers, summary.hidden) == (1, 1, 1)
    with tarfile.open(tmp_path / "b.tar") as tar:
        assert sorted(tar.getnames()) == sorted(["manifest.json", f"targets/{'ab' * 32}.topk",
                                                 f"answers/{'cd' * 32}.json", f"hidden/{'ef' * 32}.hidden"])
    other = TeacherCache(tmp_path / "other")
    assert import_bundle(other, tmp_path / "b.tar", "t").hidden == 1
    assert other.get("ab" * 32)[0].tolist() == [[4, 2]] and other.get_answer("cd" * 32) == "an answer"
    assert (other.get_hidden("ef" * 32) == states).all()


def test_the_on_policy_gate_needs_the_on_policy_measure():
    with pytest.raises(ConfigError, match='gate_metric = "on_policy" needs measure_on_policy = true'):
        parse_config('gate_metric = "on_policy"\nmeasure_on_policy = false')
    with pytest.raises(ConfigError, match=r"\[kd\] on_policy = 0.5 needs measure_on_policy = true"):
        parse_config("measure_on_policy = false\n[kd]\non_policy = 0.5")  # on-policy training needs the teacher
    assert parse_config("measure_on_policy = false").measure_on_policy is False  # the default trains off-policy

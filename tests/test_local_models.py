"""The models a user already has: an Ollama store and an LM Studio folder built in a temporary home with
their real layout (manifest JSON naming a sha256 blob), found by `conch models list`, imported by name,
checked as a pair; `conch doctor` says where the configured pair comes from and that it pairs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conch_dna.kit import STUDENT_PATH, TEACHER_PATH

import pytest
from gguf_files import hf_config, hf_weights, write_gguf
from mlx_lm import load

ROOT = Path(__file__).resolve().parents[1]


def ollama_store(root: Path, gguf: Path, name: str, tag: str) -> Path:
    """Ollama's layout: blobs/sha256-<hex> and manifests/registry.ollama.ai/library/<name>/<tag>."""
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{digest}").write_bytes(data)
    template = b'{{ .Prompt }}'
    (root / "blobs" / f"sha256-{hashlib.sha256(template).hexdigest()}").write_bytes(template)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64,
                   "size": 2},
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
                    "size": len(data)},
                   {"mediaType": "application/vnd.ollama.image.template",
                    "digest": f"sha256:{hashlib.sha256(template).hexdigest()}", "size": len(template)}]}))
    return manifest


def conch(home: Path, user_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CONCH_HOME": str(home), "HOME": str(user_home),
           "OLLAMA_MODELS": str(user_home / ".ollama" / "models"), "HF_HUB_CACHE": str(user_home / "hf"),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "conch_dna.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_ollama_and_lm_studio_models_are_listed_and_imported_by_name(tmp_path, real_pair):
    user = tmp_path / "user"
    home = tmp_path / "conch-home"
    ollama_store(user / ".ollama" / "models", real_pair.gguf, "smollm2", "135m")
    studio = user / ".lmstudio" / "models" / "HuggingFaceTB" / "SmolLM2-135M-Instruct-GGUF"
    studio.mkdir(parents=True)
    shutil.copy(real_pair.gguf, studio / real_pair.gguf.name)
    config = hf_config("phi3")
    write_gguf(studio.parent / "tiny-phi3.gguf", config, hf_weights(config))  # not in a repo folder: not listed
    bad = user / ".lmstudio" / "models" / "someone" / "mamba-GGUF"
    bad.mkdir(parents=True)
    (bad / "mamba.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 64)

    listed = json.loads(conch(home, user, "models", "list", "--json").stdout)
    by_name = {m["name"]: m for m in listed}
    smol = by_name["ollama:smollm2:135m"]
    assert smol["architecture"] == "llama" and smol["quantization"] == "Q4_1" and smol["usable"]
    assert smol["path"].endswith("sha256-" + hashlib.sha256(real_pair.gguf.read_bytes()).hexdigest())
    studio_name = f"lmstudio:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/{real_pair.gguf.name}"
    assert by_name[studio_name]["usable"] and by_name[studio_name]["size_bytes"] == real_pair.gguf.stat().st_size
    assert by_name["lmstudio:someone/mamba-GGUF/mamba.gguf"]["usable"] is False
    table = conch(home, user, "models", "list").stdout
    assert "ollama:smollm2:135m" in table and "yes: import it" in table

    done = conch(home, user, "models", "import", "ollama:smollm2:135m", "--dtype", "q8")
    assert done.returncode == 0, done.stdout + done.stderr
    imported = home / "models" / "smollm2-135m"
    model, tokenizer = load(str(imported))
    assert json.loads((imported / "conch_import.json").read_text())["dtype"] == "q8"
    assert tokenizer.encode("What is the capital of France?") == load(str(real_pair.teacher))[1].encode(
        "What is the capital of France?")
    assert "imported" in {m["source"] for m in json.loads(conch(home, user, "models", "list", "--json").stdout)}
    missing = conch(home, user, "models", "import", "ollama:qwen2.5:7b-instruct")
    assert missing.returncode == 2 and "Ollama has no model 'qwen2.5:7b-instruct'" in missing.stdout
    assert "smollm2:135m" in missing.stdout  # it says what is there
    escape = conch(home, user, "models", "import", "lmstudio:../../etc/passwd")
    assert escape.returncode == 2 and "not an LM Studio model name" in escape.stdout

    paired = conch(home, user, "models", "pair", "lmstudio:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
                   str(real_pair.student))
    assert paired.returncode == 0 and "they pair" in paired.stdout, paired.stdout
    apart = conch(home, user, "models", "pair", str(imported), STUDENT_PATH)
    assert apart.returncode == 1 and "do not share token ids" in apart.stdout


def test_doctor_says_where_the_pair_comes_from_and_whether_it_pairs(tmp_path):
    from conch_dna.lifecycle.doctor import check_model, check_pair
    from conch_dna.models.gguf.importer import import_gguf
    from conch_dna.settings.config import Config

    config = hf_config("llama")
    imported = import_gguf(write_gguf(tmp_path / "m.gguf", config, hf_weights(config)), tmp_path / "imported")
    assert "imported by conch from m.gguf as float32" in check_model("teacher", str(imported)).value
    assert "a local mlx-lm directory" in check_model("student", STUDENT_PATH).value
    good = check_pair(Config(teacher=str(imported), student=STUDENT_PATH))  # the kit's tokenizer, imported
    assert good.ok and "they pair" in good.value
    real_vocab = Config(teacher=TEACHER_PATH, student=str(tmp_path / "spm"))
    from test_gguf_import import sentencepiece_gguf

    import_gguf(sentencepiece_gguf(tmp_path / "spm.gguf"), tmp_path / "spm")
    bad = check_pair(real_vocab)
    assert not bad.ok and "conch models pair" in bad.hint

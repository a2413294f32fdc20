"""`conch models import`: GGUF files become mlx-lm directories that load and answer as the file's model.

References outside the importer: the kit model the GGUF files are written from, llama.cpp's own
gguf-py (writer, quantizer and dequantizer), the kit's original tokenizer, a plain Python BPE over
the real file's vocabulary, and the real model's known greedy answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conch_dna.gguf_import import GGUFImportError, import_gguf, read_tensor_infos
from conch_dna.kit import TEACHER_PATH

import mlx.core as mx
import numpy as np
import pytest
from gguf_files import kit_weights, reference_weights, write_gguf
from mlx_lm import generate, load
from mlx_lm.models import llama, qwen2

PROBE = mx.array([[1, 45, 300, 17, 99, 2, 250, 251, 10, 7, 400, 33]])


def reference_model(arch: str, weights: dict, config: dict):
    module = {"llama": llama, "qwen2": qwen2}[arch]
    model = module.Model(module.ModelArgs.from_dict({**config, "model_type": arch}))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_import_gives_the_source_models_logits(tmp_path, arch):
    weights, config = kit_weights(arch)
    gguf_path = write_gguf(tmp_path / "m.gguf", arch, "F32", weights, config)
    model, _ = load(str(import_gguf(gguf_path, tmp_path / "out")))
    expected = reference_model(arch, weights, config)(PROBE)
    np.testing.assert_allclose(np.array(model(PROBE)), np.array(expected), atol=1e-4, rtol=1e-4)
    if arch == "llama":  # the kit teacher itself, loaded from its own directory
        kit, _ = load(TEACHER_PATH)
        np.testing.assert_allclose(np.array(model(PROBE)), np.array(kit(PROBE)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("dtype", ["float32", "keep"])
def test_quantized_import_matches_gguf_py_dequantization(tmp_path, qtype, dtype):
    weights, config = kit_weights("llama")
    gguf_path = write_gguf(tmp_path / "m.gguf", "llama", qtype, weights, config)
    out = import_gguf(gguf_path, tmp_path / "out", dtype)
    model, _ = load(str(out))
    expected = reference_model("llama", reference_weights(gguf_path, "llama", config), config)(PROBE)
    got = np.array(model(PROBE))
    # MLX's quantized matmul keeps scales in float16 and accumulates in its own order: over the kit's
    # three blocks kept 4-bit weights agree to a few hundredths of a logit (the argmax everywhere)
    tolerance = 2e-3 if dtype == "float32" else 8e-2
    np.testing.assert_allclose(got, np.array(expected), atol=tolerance, rtol=tolerance)
    assert (got.argmax(-1) == np.array(expected).argmax(-1)).all()
    quantized = "quantization" in json.loads((out / "config.json").read_text())
    assert quantized == (dtype == "keep" and qtype != "F16")


def test_kit_tokenizer_survives_the_round_trip(tmp_path):
    weights, config = kit_weights("llama")
    out = import_gguf(write_gguf(tmp_path / "m.gguf", "llama", "Q8_0", weights, config), tmp_path / "out")
    _, ours = load(str(out))
    _, original = load(TEACHER_PATH)
    texts = ["Why does ice float on water?", "  two  spaces\tand a tab\n\nnew lines ", "digits 12345 and 3.14",
             "unicode: naïve café, 東京, emoji 😀", "<|im_start|>user\nhi<|im_end|>\n", "", "x" * 300]
    for text in texts:
        assert ours.encode(text) == original.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    assert ours.apply_chat_template(chat) == original.apply_chat_template(chat)
    assert ours.eos_token_ids == {2}


def test_unsupported_tensor_type_and_architecture_are_named(tmp_path):
    weights, config = kit_weights("llama")
    # K-quants need rows of 256 values: the file need not hold a consistent model, the type is refused first
    wide = {k: np.resize(v, (v.shape[0], 256)) if v.ndim == 2 else v for k, v in weights.items()}
    kquant = write_gguf(tmp_path / "k.gguf", "llama", "Q4_K", wide, config)
    assert {t.type_name for t in read_tensor_infos(kquant)} == {"Q4_K", "F32"}
    with pytest.raises(GGUFImportError, match="stored as Q4_K"):
        import_gguf(kquant, tmp_path / "out-k")
    assert not (tmp_path / "out-k").exists()

    weights, config = kit_weights("llama")
    other = write_gguf(tmp_path / "p.gguf", "phi3", "F32", weights, config)
    with pytest.raises(GGUFImportError, match="architecture 'phi3'"):
        import_gguf(other, tmp_path / "out-p")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFImportError, match="not a GGUF file"):
        import_gguf(tmp_path / "not.gguf", tmp_path / "out-n")


def test_cli_imports_and_refuses_a_non_empty_output(tmp_path):
    weights, config = kit_weights("llama")
    gguf_path = write_gguf(tmp_path / "m.gguf", "llama", "Q4_0", weights, config)
    cmd = [sys.executable, "-m", "conch_dna.cli", "models", "import", str(gguf_path), "-o", str(tmp_path / "out"),
           "--dtype", "keep"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["bits"] == 4
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stdout


# ---- the real file: SmolLM2-135M-Instruct, Q4_1 layers and a Q8_0 embedding ----

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def reference_bpe(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int], specials: list[str]):
    """Byte-level BPE as llama.cpp runs it for SmolLM ('smollm' pre-tokenizer), in plain Python."""
    import regex

    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    byte_chars = bytes_to_unicode()
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            ids.append(vocab[part])
            continue
        for chunk in regex.split(r"(\p{N})", part):
            for word in regex.findall(gpt2, chunk):
                symbols = [byte_chars[b] for b in word.encode()]
                while len(symbols) > 1:
                    pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
                    rank, i = min(pairs)
                    if rank == 1 << 30:
                        break
                    symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
                ids.extend(vocab[s] for s in symbols)
    return ids


def test_real_gguf_tokenizer_matches_a_plain_bpe(real_pair):
    _, tokenizer = load(str(real_pair.teacher))
    meta = mx.load(str(real_pair.gguf), return_metadata=True)[1]
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = np.array(meta["tokenizer.ggml.token_type"])
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(meta["tokenizer.ggml.merges"])}
    specials = [tokens[i] for i in np.flatnonzero(types == 3)]
    texts = ["What is the capital of France?", "Prices rose 12.5% in 2024, from $1,099 to $1,236.",
             "  indented\tcode:\n    return x  # done\n\n", "naïve café, Zürich, 東京, русский, emoji 😀👍",
             "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "don't we'll it's I'M",
             "x" * 50 + " " + "ab" * 30]
    for text in texts:
        assert tokenizer.encode(text) == reference_bpe(text, vocab, ranks, specials), text
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_real_gguf_answers_as_smollm2_does(real_pair, tmp_path):
    """Float32 and still-quantized imports give the model's known greedy answer."""
    quantized = import_gguf(real_pair.gguf, tmp_path / "q4", "keep")
    prompt_chat = [{"role": "user", "content": "What is the capital of France?"}]
    for path in (real_pair.teacher, quantized):
        model, tokenizer = load(str(path))
        prompt = tokenizer.apply_chat_template(prompt_chat, add_generation_prompt=True)
        assert generate(model, tokenizer, prompt=prompt, max_tokens=12) == "The capital of France is Paris."
    config = json.loads((quantized / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["model.embed_tokens"]["bits"] == 8
    assert {t.type_name for t in read_tensor_infos(real_pair.gguf)} == {"Q4_1", "Q8_0", "F32"}


def test_student_cut_keeps_evenly_spaced_blocks_and_loads(tmp_path):
    from conch_dna.realpair import cut_layers, kept_layers

    assert kept_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert kept_layers(3, 2) == [0, 2] and kept_layers(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="between 1 and 30"):
        kept_layers(30, 31)
    student = cut_layers(Path(TEACHER_PATH), tmp_path / "student", 2)
    model, _ = load(str(student))
    teacher, _ = load(TEACHER_PATH)
    assert len(model.layers) == 2
    np.testing.assert_array_equal(np.array(model.layers[1].mlp.up_proj.weight),
                                  np.array(teacher.layers[2].mlp.up_proj.weight))
    assert model(PROBE).shape == teacher(PROBE).shape

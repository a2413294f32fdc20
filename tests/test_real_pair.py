"""The whole loop on the real pair: SmolLM2-135M-Instruct (imported from its GGUF) teaches its cut.

EGO calls record traces with captured top-k, one retrain distils a few steps, the gate promotes,
and `neurons.get` answers from the new version, as a plain `mlx_lm.load(adapter_path=...)` does.
"""

from __future__ import annotations

import json

from conch_dna.lifecycle.cycle import retrain_domain
from conch_dna.models.versions import current_adapter_path
from conch_dna.settings.config import load_config
from conch_dna.traces.ego import Ego
from conch_dna.traces.store import TraceStore

from mlx_lm import generate, load

from neurons import NeuronRegistry

COUNTRIES = ["France", "Italy", "Spain", "Germany", "Japan", "Egypt", "Canada", "Brazil", "Kenya", "Norway"]
QUESTION = "What is the capital of {}? Answer in one short sentence."


def test_ego_traces_retrain_promote_and_serve_on_the_real_pair(real_pair, conch_home):
    conch_home.mkdir(mode=0o700)
    (conch_home / "config.toml").write_text(
        f'teacher = "{real_pair.teacher}"\nstudent = "{real_pair.student}"\nheldout_fraction = 0.3\n'
        # the path from EGO traces to a served version is what this tests: 4 steps on these 7 one-sentence answers
        # leave a student that has not learnt to stop and repeats its sentence, which the gate's answer checks
        # rightly refuse (measured: repeated token 4-grams 0.10 -> 0.38); test_degeneration.py tests those
        "max_repeat_rise = 1.0\nmin_distinct_ratio = 0.0\nmax_unended_rise = 1.0\n"
        "min_heldout = 2\n[kd]\nnum_iters = 4\nbatch_size = 4\nlearning_rate = 5e-4\nlora_layers = 15\n"
        "lora_rank = 8\nmax_answer_tokens = 32\nsample_max_tokens = 32\nsteps_per_report = 1\n")
    config = load_config(conch_home)
    ego = Ego(home=conch_home, max_tokens=32)
    try:
        answers = [ego.generate("task", [{"role": "user", "content": QUESTION.format(c)}]) for c in COUNTRIES]
    finally:
        ego.close()
    assert "Paris" in answers[0]
    counts = TraceStore.for_home(conch_home, config).counts("task")
    assert counts.train + counts.heldout == len(COUNTRIES) and counts.heldout >= 2

    result = retrain_domain(conch_home, "task", config)
    assert result.status == "promoted", result.reason
    assert result.candidate_metrics["kl"] < 0.98 * result.current_metrics["kl"]
    version_dir = current_adapter_path(conch_home, "task")
    metrics = json.loads((version_dir / "kd_metrics.json").read_text())
    # the captured top-k was used: no teacher pass (one allowed, for an answer BPE re-tokenises differently)
    assert metrics["teacher_forward_passes"] <= 1

    prompt = [{"role": "user", "content": QUESTION.format("Portugal")}]
    registry = NeuronRegistry(conch_home, watch=False)
    try:
        neuron = registry.get("task")
        assert neuron.version == result.version == "v0001"
        served = neuron.generate(prompt, max_tokens=16)
    finally:
        registry.close()
    model, tokenizer = load(str(real_pair.student), adapter_path=str(version_dir))
    expected = generate(model, tokenizer, prompt=tokenizer.apply_chat_template(prompt, add_generation_prompt=True),
                        max_tokens=16)
    base, _ = load(str(real_pair.student))
    before = generate(base, tokenizer, prompt=tokenizer.apply_chat_template(prompt, add_generation_prompt=True),
                      max_tokens=16)
    assert served == expected and served != before


def test_answer_mask_covers_exactly_the_assistant_turn_with_the_real_chat_template(real_pair):
    from conch_dna.models.chat import encode_chat
    from conch_dna.training.data import KDExample, collate

    import numpy as np

    _, tokenizer = load(str(real_pair.teacher))
    for chat in ([{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7 is prime."}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And 2+2?"},
                  {"role": "assistant", "content": "2 + 2 = 4, naïvely."}]):
        tokens, offset = encode_chat(tokenizer, chat)
        n = len(tokens) - offset
        rows = (np.zeros((n, 4), np.int32), np.zeros((n, 4), np.float16))
        example = KDExample(np.array(tokens, np.int32), offset, *rows)
        _, targets, mask, _, _ = collate([example], 256)
        counted = np.array(targets)[0][np.array(mask)[0] > 0].tolist()
        assert tokenizer.decode(counted) == chat[-1]["content"] + "<|im_end|>\n"
        assert counted == tokens[offset:]

"""EGO capture: the teacher's top-k per generated token, recorded with the trace, no second pass."""

from conch_dna.kit import STUDENT_PATH, TEACHER_PATH
from conch_dna.models.chat import encode_chat
from conch_dna.models.loading import tokenizer_fingerprint
from conch_dna.settings.config import load_config
from conch_dna.traces.ego import Ego
from conch_dna.traces.store import TraceStore
from conch_dna.training.losses import PAD_LOGPROB
from conch_dna.training.targets.teacher import TeacherCache, TeacherScorer

import numpy as np


def test_ego_records_traces_whose_topk_matches_the_teacher_and_saves_a_pass(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'teacher = "{TEACHER_PATH}"\nstudent = "{STUDENT_PATH}"\n')
    ego = Ego(home=home, top_k=16, max_tokens=80)
    chat = [{"role": "system", "content": "You are the memory neuron. Store and recall facts."},
            {"role": "user", "content": "Remember that Ada likes chess."}]
    answer = ego.generate("memory", chat)
    assert answer.strip() and ego.last_trace_id
    store = TraceStore.for_home(home, load_config(home))
    (trace,) = store.traces_of("memory", "train") + store.traces_of("memory", "heldout")
    assert trace["messages"][-1] == {"role": "assistant", "content": answer}
    topk = trace["topk"]
    assert topk["token_ids"].shape[1] == 16 and topk["tokenizer"] == ego.fingerprint

    # the capture equals what one teacher forward pass over the finished chat gives
    scorer = TeacherScorer(TEACHER_PATH, TeacherCache(tmp_path / "cache"), top_k=16)
    tokens, offset = encode_chat(ego.tokenizer, trace["messages"])
    ids, logprobs = scorer.targets(tokens, offset)
    rows = len(topk["token_ids"])
    assert rows == len(tokens) - offset - 1  # every generated token incl. EOS; the template adds "\n"
    assert (topk["token_ids"][:, 0] == ids[:rows, 0]).all()
    # (the cached side is packed: 8-bit log-probs, coarse deep in the tail, so compare probabilities)
    assert np.allclose(np.exp(topk["logprobs"][:, :4].astype(np.float32)),
                       np.exp(logprobs[:rows, :4].astype(np.float32)), atol=0.01)

    # so a retrain uses the capture and needs no teacher pass for this trace
    fresh = TeacherScorer(TEACHER_PATH, TeacherCache(tmp_path / "cache2"), top_k=16, vocab_limit=len(ego.tokenizer))
    fresh.example(trace["messages"], ego.tokenizer, topk, tokenizer_fingerprint(ego.tokenizer))
    assert fresh.forward_passes == 0 and not fresh.loaded
    fresh.hidden_layers = [0, 1]  # with the hidden-state loss on too: the capture has none, none is made
    assert fresh.example(trace["messages"], ego.tokenizer, topk, tokenizer_fingerprint(ego.tokenizer)).hidden is None
    assert fresh.forward_passes == 0 and not fresh.loaded
    fresh.hidden_layers = None

    # a capture holding ids of the teacher's padded rows (576 vs the student's 512) is still used:
    # those entries become padding, their mass goes to the tail bucket
    padded = {**topk, "token_ids": topk["token_ids"].copy()}
    padded["token_ids"][:, -1] = 570
    example = fresh.example(trace["messages"], ego.tokenizer, padded, tokenizer_fingerprint(ego.tokenizer))
    assert fresh.forward_passes == 0 and not fresh.loaded
    assert example.topk_ids.max() < len(ego.tokenizer)
    assert (example.topk_logprobs[:rows, -1] == PAD_LOGPROB).all()
    ego.close()


def test_a_capture_cut_short_by_max_tokens_trains_on_its_prefix_without_a_teacher_pass(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'teacher = "{TEACHER_PATH}"\nstudent = "{STUDENT_PATH}"\n')
    ego = Ego(home=home, top_k=16, max_tokens=5)
    ego.generate("memory", [{"role": "user", "content": "Remember that Ada likes chess."}])
    ego.close()
    store = TraceStore.for_home(home, load_config(home))
    (trace,) = store.traces_of("memory", "train") + store.traces_of("memory", "heldout")
    assert len(trace["topk"]["token_ids"]) == 5
    scorer = TeacherScorer(TEACHER_PATH, TeacherCache(tmp_path / "cache"), top_k=16, vocab_limit=len(ego.tokenizer))
    example = scorer.example(trace["messages"], ego.tokenizer, trace["topk"], ego.fingerprint)
    assert scorer.forward_passes == 0
    full, offset = encode_chat(ego.tokenizer, trace["messages"])
    # the example stops at the last generated token: no end-of-turn the teacher never wrote
    assert example.tokens.tolist() == full[: offset + 5] and example.offset == offset
    assert (example.topk_ids[:, 0] == trace["topk"]["token_ids"][:, 0]).all()
    # a capture shorter than that (a cut in the middle of the answer) is not trusted
    short = {**trace["topk"], "token_ids": trace["topk"]["token_ids"][:3], "logprobs": trace["topk"]["logprobs"][:3]}
    scorer.example(trace["messages"], ego.tokenizer, short, ego.fingerprint)
    assert scorer.forward_passes == 1

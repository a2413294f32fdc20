"""An upstream teacher's logprobs as a trace's top-k: token strings mapped back with the real kit
teacher tokenizer, as mlx_lm.server (raw vocabulary entries) and OpenAI (token text) send them."""

import math

from conch_dna.kit import TEACHER_PATH
from conch_dna.models.loading import load_tokenizer_only, tokenizer_fingerprint
from conch_dna.traces.trace import MIN_STORED_LOGPROB, TopK
from conch_dna.traces.upstream import TokenMap, topk_from_logprobs, trace_messages

import pytest


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_only(TEACHER_PATH)


@pytest.fixture(scope="module")
def token_map(tokenizer):
    return TokenMap(tokenizer)


def position(*alternatives):
    return {"token": alternatives[0][0], "logprob": alternatives[0][1],
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in alternatives]}


def test_raw_vocabulary_entries_and_token_texts_both_map_to_the_ids(tokenizer, token_map):
    ids = tokenizer.encode(" Send the email now", add_special_tokens=False)
    raw = tokenizer.convert_ids_to_tokens(ids)
    texts = [tokenizer.decode([i]) for i in ids]
    assert [token_map.id(t) for t in raw] == ids
    assert [token_map.id(t) for t in texts] == ids
    assert token_map.id("no such token at all") is None and token_map.id(None) is None


def test_rows_are_best_first_cut_to_the_narrowest_and_clamped(tokenizer, token_map):
    a, b, c = (tokenizer.convert_ids_to_tokens([i])[0] for i in tokenizer.encode(" a b c", add_special_tokens=False))
    content = [position((b, -1.0), (a, -0.5), (c, -3.0)), position((c, 0.2), (a, -1e9))]
    topk = topk_from_logprobs(content, token_map, "fp")
    ids = {t: token_map.id(t) for t in (a, b, c)}
    assert topk["token_ids"] == [[ids[a], ids[b]], [ids[c], ids[a]]]
    assert topk["logprobs"] == [[-0.5, -1.0], [0.0, MIN_STORED_LOGPROB]]
    TopK.model_validate({**topk, "tokenizer": tokenizer_fingerprint(tokenizer)})  # a trace keeps it as it is


def test_a_position_without_alternatives_gives_its_own_token(tokenizer, token_map):
    t = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a", add_special_tokens=False))[0]
    topk = topk_from_logprobs([{"token": t, "logprob": -0.25, "top_logprobs": []}], token_map, "fp")
    assert topk["token_ids"] == [[token_map.id(t)]] and topk["logprobs"] == [[-0.25]]


@pytest.mark.parametrize("content", [
    None, [], "text", [7],
    [{"token": "no such token at all", "logprob": -0.1}],
    [{"token": "a", "logprob": math.nan}],
    [{"token": "a", "logprob": "-0.1"}],
    [{"token": "a", "logprob": True}],
    [{"token": "a"}],
])
def test_what_cannot_be_mapped_gives_no_top_k(token_map, content):
    assert topk_from_logprobs(content, token_map, "fp") is None


def test_trace_messages_keep_text_and_tool_calls_as_a_trace_does():
    call = {"id": "x", "type": "function", "function": {"name": "read_file", "arguments": "{}"}, "index": 0}
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Plan "}, {"type": "image_url"},
                                             {"type": "text", "text": "it."}]},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "done", "tool_call_id": "x"}, {"role": "user", "content": ""}]
    kept = {"id": "x", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}
    assert trace_messages(messages, "OK.") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plan it."},
        {"role": "assistant", "content": None, "tool_calls": [kept]},
        {"role": "tool", "content": "done", "tool_call_id": "x"}, {"role": "assistant", "content": "OK."}]
    assert trace_messages(messages[:2], {"role": "assistant", "content": None, "tool_calls": [call]})[-1] == {
        "role": "assistant", "content": None, "tool_calls": [kept]}

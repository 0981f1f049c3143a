"""Black-box tests of Tidepool's OpenAI-compatible API with the official `openai` SDK, against a
real `tidepool serve` on the real small models (SmolLM2-135M-Instruct, Gemma-3-270M,
all-MiniLM-L6-v2). Usage counts are checked against tokenizers rebuilt independently of llama.cpp,
and greedy output against the raw llama.cpp loop (`tidepool bench raw-generate`)."""

from __future__ import annotations

import base64
import json
import math
import struct
import threading
import urllib.error
import urllib.request

import openai
import pytest

from conftest import MODELS_DIR
from independent_tokenizer import count_gguf, count_wordpiece

CHAT = "smollm2-135m-instruct"
BASE = "gemma-3-270m"
EMBED = "all-minilm-l6-v2"
SMOL_GGUF = MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_TOKENIZER = MODELS_DIR / "all-minilm-l6-v2" / "tokenizer.json"
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]


def raw_post(server, path: str, body: bytes, key: str | None, content_type="application/json"):
    req = urllib.request.Request(server.base + path, data=body, method="POST")
    req.add_header("Content-Type", content_type)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_models_lists_all_configured_models(client):
    ids = {m.id for m in client.models.list().data}
    assert {CHAT, BASE, EMBED} <= ids


def test_chat_completion(client):
    r = client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=32, temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == CHAT
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 32
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_matches_non_stream_and_reports_usage(client):
    kwargs = dict(model=CHAT, messages=MESSAGES, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_repeated_system_prompt_reports_cached_tokens(server, client):
    """The pooled engine reuses a repeated ~600-token system prompt: the SDK sees
    `usage.prompt_tokens_details.cached_tokens` (0 the first time, all but the last prompt token
    after), the same greedy answer, and the ledger row stores the same count."""
    rules = "".join(
        f"Rule {i}: boats in berth {i} leave before the tide turns and report their cargo.\n" for i in range(1, 27)
    )
    messages = [
        {"role": "system", "content": "You are the harbour master's assistant. Python check.\n" + rules},
        {"role": "user", "content": "Which berth leaves first?"},
    ]
    kwargs = dict(model=CHAT, messages=messages, max_tokens=12, temperature=0)
    first = client.chat.completions.create(**kwargs)
    raw = client.chat.completions.with_raw_response.create(**kwargs)
    second = raw.parse()
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content
    row = server.usage_row(raw.headers["x-request-id"])
    assert row["cached_prompt_tokens"] == second.usage.prompt_tokens_details.cached_tokens
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=8, stream=True))
    assert chunks and all(c.usage is None for c in chunks)


def test_completions_on_base_model(client):
    r = client.completions.create(model=BASE, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8


def test_completion_usage_equals_independent_token_count(client):
    prompt = "Once upon a time, in a quiet village by the sea, there lived an old fisherman who"
    r = client.completions.create(model=CHAT, prompt=prompt, max_tokens=20, temperature=0)
    assert r.usage.prompt_tokens == count_gguf(SMOL_GGUF, prompt)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20
    # The generated text re-tokenises to the billed count (greedy text is canonical BPE here).
    assert count_gguf(SMOL_GGUF, r.choices[0].text) == r.usage.completion_tokens


def test_stop_sequence_ends_generation(client):
    free = client.completions.create(model=CHAT, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    text = free.choices[0].text
    assert len(text) > 3
    stop = text.strip()[:2].strip() or text[:2]
    r = client.completions.create(model=CHAT, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text
    assert text.startswith(r.choices[0].text)


def test_temperature_zero_is_reproducible_and_equals_raw_engine(server, client):
    prompt = "The three primary colours are"
    outs = [
        client.completions.create(model=CHAT, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
        for _ in range(2)
    ]
    assert outs[0] == outs[1]
    raw = json.loads(
        server.cli("bench", "raw-generate", "--model-path", str(SMOL_GGUF), "--prompt", prompt, "--max-tokens", "24")
    )
    assert raw["text"] == outs[0]


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=CHAT, prompt="A list of fruits:", max_tokens=16, temperature=0.9, seed=7)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_rank_paraphrase_above_unrelated(client):
    texts = ["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply today."]
    r = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vecs)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vecs)
    assert _cos(vecs[0], vecs[1]) > _cos(vecs[0], vecs[2]) + 0.2
    assert r.usage.prompt_tokens == sum(count_wordpiece(MINILM_TOKENIZER, t) for t in texts)


def test_embeddings_base64_equals_float(server, api_key):
    body = lambda fmt: json.dumps({"model": EMBED, "input": "hello world", "encoding_format": fmt}).encode()
    _, _, f = raw_post(server, "/v1/embeddings", body("float"), api_key)
    _, _, b = raw_post(server, "/v1/embeddings", body("base64"), api_key)
    floats = json.loads(f)["data"][0]["embedding"]
    raw = base64.b64decode(json.loads(b)["data"][0]["embedding"])
    decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert decoded == pytest.approx(floats, abs=1e-6)


def test_sdk_default_embedding_call(client):
    # The SDK asks for base64 by default and decodes it itself.
    r = client.embeddings.create(model=EMBED, input="single string input")
    assert len(r.data) == 1 and len(r.data[0].embedding) == 384


def test_sixteen_concurrent_streams_all_complete(client):
    results: list[str | Exception] = [""] * 16

    def run(i: int) -> None:
        try:
            stream = client.chat.completions.create(
                model=CHAT,
                messages=[{"role": "user", "content": f"Say something about the number {i}."}],
                max_tokens=24, temperature=0.7, seed=i, stream=True,
            )
            parts, finish = [], None
            for c in stream:
                if c.choices:
                    parts.append(c.choices[0].delta.content or "")
                    finish = c.choices[0].finish_reason or finish
            results[i] = "".join(parts) if finish in ("stop", "length") else RuntimeError(f"finish={finish}")
        except Exception as e:  # collected and asserted below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    assert all(isinstance(r, str) and r for r in results)


# ---- errors: OpenAI-shaped bodies with stable codes, for both stream and non-stream ----

def test_invalid_key(server):
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="tp-nope-nope", max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model=CHAT, messages=MESSAGES, stream=stream)
        assert e.value.code == "invalid_api_key"


def test_revoked_key_fails_at_once(server):
    key = server.create_key("acme", "to-revoke")
    c = openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0)
    assert c.models.list().data
    key_id = next(k for k in server.cli("keys", "list", "--database-url", server.database_url).splitlines() if "to-revoke" in k).split()[0]
    server.cli("keys", "revoke", "--database-url", server.database_url, key_id)
    with pytest.raises(openai.AuthenticationError) as e:
        c.models.list()
    assert e.value.code == "invalid_api_key"


def test_unknown_model(client):
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="no-such-model", messages=MESSAGES, stream=stream)
        assert e.value.code == "model_not_found"


def test_context_length_exceeded(client):
    long_prompt = "word " * 5000
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=CHAT, prompt=long_prompt, max_tokens=8)
    assert e.value.code == "context_length_exceeded"


@pytest.mark.parametrize(
    "param,value", [("temperature", 5), ("top_p", 0), ("max_tokens", -1), ("presence_penalty", 3), ("n", 2)]
)
def test_bad_parameters(client, param, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT, messages=MESSAGES, **{param: value})
    assert e.value.code == "invalid_request_error"
    assert e.value.param == param


def test_embedding_model_refuses_chat(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=EMBED, messages=MESSAGES)


def test_malformed_json_gets_openai_error_body(server, api_key):
    status, headers, body = raw_post(server, "/v1/chat/completions", b'{"model": "x", ', api_key)
    assert status == 400
    err = json.loads(body)["error"]
    assert err["code"] == "invalid_request_error" and err["type"] and err["message"]


def test_body_over_limit_is_413(server, api_key):
    big = json.dumps({"model": CHAT, "prompt": "a" * (5 * 1024 * 1024)}).encode()
    status, _, body = raw_post(server, "/v1/completions", big, api_key)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_request_id_is_echoed(server, api_key):
    rid = "0190d6a4-0000-7000-8000-000000000001"
    req = urllib.request.Request(server.base + "/v1/models", headers={"Authorization": f"Bearer {api_key}", "x-request-id": rid})
    with urllib.request.urlopen(req) as r:
        assert r.headers["x-request-id"] == rid


# ---- metering ----

def test_every_request_writes_one_usage_row(server, client):
    raw = client.completions.with_raw_response.create(model=CHAT, prompt="Hello", max_tokens=4, temperature=0)
    rid = raw.headers["x-request-id"]
    r = raw.parse()
    row = server.usage_row(rid)
    assert row is not None
    assert row["status"] == "ok"
    assert row["prompt_tokens"] == r.usage.prompt_tokens
    assert row["completion_tokens"] == r.usage.completion_tokens
    # A failed request is metered too, with its error code.
    bad = client.completions.with_raw_response
    with pytest.raises(openai.BadRequestError) as e:
        bad.create(model=CHAT, prompt="x", max_tokens=8, temperature=9)
    failed = server.usage_row(e.value.response.headers["x-request-id"])
    assert failed is not None and failed["status"] != "ok"


def test_disconnect_mid_stream_bills_delivered_tokens(server, api_key):
    body = json.dumps({
        "model": CHAT, "stream": True, "max_tokens": 400, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
    }).encode()
    req = urllib.request.Request(server.base + "/v1/chat/completions", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {api_key}")
    resp = urllib.request.urlopen(req, timeout=120)
    rid = resp.headers["x-request-id"]
    delivered = 0
    for line in resp:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                delivered += 1
                if delivered == 5:
                    break
    resp.close()  # the client goes away mid-stream
    row = server.usage_row(rid)
    assert row is not None, "no usage row for the disconnected stream"
    assert row["status"] == "client_disconnected"
    assert abs(row["completion_tokens"] - 5) <= 1

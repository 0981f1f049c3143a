"""The Batch API through the official `openai` SDK against a real `tidepool serve` on SmolLM2:
upload a 200-line file, create the batch, poll it, download the output — one line per custom_id,
request counts right — and check the money: every line is billed once at the batch discount
(50 % by default) of the online price, as the batch object, `GET /v1/usage` and the ledger say."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
import urllib.request

import openai
import pytest

CHAT_MODEL = "smollm2-135m-instruct"
# tidepool.toml's SmolLM2 prices, nano-units per million tokens.
INPUT_PER_MTOK = 50_000_000
OUTPUT_PER_MTOK = 200_000_000
LINES = 200
POLL_S_MAX = 900  # a bound, not a target: 64 lines took 120 s on a loaded 2-vCPU VM (debug build)


def _get_json(server, key: str, path: str) -> dict:
    request = urllib.request.Request(server.base + path, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _online_cost(prompt_tokens: int, completion_tokens: int) -> int:
    exact = prompt_tokens * INPUT_PER_MTOK + completion_tokens * OUTPUT_PER_MTOK
    return -(-exact // 1_000_000)


def test_a_200_line_batch_through_the_openai_sdk(server, tmp_path):
    key = server.create_key("batcher", "pytest")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0, timeout=60)
    path = tmp_path / "requests.jsonl"
    with path.open("w") as out:
        for i in range(LINES):
            out.write(json.dumps({
                "custom_id": f"task-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": CHAT_MODEL,
                    "messages": [{"role": "user", "content": f"Count to {i % 7 + 2}."}],
                    "max_tokens": 8,
                },
            }) + "\n")

    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    assert uploaded.purpose == "batch"
    assert uploaded.bytes == path.stat().st_size
    assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "pytest"},
    )
    assert batch.status == "in_progress"
    assert batch.request_counts.total == LINES
    assert batch.metadata == {"suite": "pytest"}

    deadline = time.monotonic() + POLL_S_MAX
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == LINES
    assert batch.request_counts.completed == LINES
    assert batch.request_counts.failed == 0
    assert batch.error_file_id is None
    assert any(b.id == batch.id for b in client.batches.list(limit=10).data)

    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"task-{i}" for i in range(LINES)]
    expected_cost = 0
    for line in lines:
        assert line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == CHAT_MODEL
        usage = body["usage"]
        assert 1 <= usage["completion_tokens"] <= 8
        online = _online_cost(usage["prompt_tokens"], usage["completion_tokens"])
        # SmolLM2's prices are even, so half the online price is exact per line.
        assert online % 2 == 0
        expected_cost += online // 2

    # The batch carries its own cost; the usage API and the ledger agree, to the nano-unit.
    raw = _get_json(server, key, f"/v1/batches/{batch.id}")
    assert raw["usage"]["cost_nanos"] == expected_cost
    report = _get_json(server, key, "/v1/usage?scope=tenant")
    assert report["batch"] == {"requests": LINES, "cost_nanos": expected_cost}
    rows = [r for r in report["data"] if r["model"] == CHAT_MODEL]
    assert rows[0]["requests"] == LINES
    assert rows[0]["cost_nanos"] == expected_cost
    con = sqlite3.connect(f"file:{server.db_path}?mode=ro", uri=True, timeout=5)
    try:
        billed = con.execute(
            "SELECT COUNT(*), SUM(cost_nanos) FROM usage_entries WHERE batch_id = ?", (batch.id,)
        ).fetchone()
        balance = con.execute(
            "SELECT balance_nanos, reserved_nanos FROM accounts WHERE tenant_id = 'batcher'"
        ).fetchone()
    finally:
        con.close()
    assert billed == (LINES, expected_cost)
    assert balance == (100 * 1_000_000_000 - expected_cost, 0)

    # Files are the tenant's: another tenant's key gets 404.
    stranger = openai.OpenAI(
        base_url=server.base + "/v1", api_key=server.create_key("stranger", "pytest"), max_retries=0
    )
    with pytest.raises(openai.NotFoundError):
        stranger.files.retrieve(batch.output_file_id)
    with pytest.raises(openai.NotFoundError):
        stranger.batches.retrieve(batch.id)


def test_a_bad_line_fails_the_batch_with_its_line_number(server, tmp_path):
    key = server.create_key("batcher-bad", "pytest")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0)
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [("duplicate_custom_id", 2)]
    with pytest.raises(openai.ConflictError) as raised:
        client.batches.cancel(batch.id)
    assert raised.value.code == "batch_not_cancellable"


# --------------------------------------------------------------------------------------------
# kill -9 mid-batch (the fake engine: this checks the crash rule, not generation)

CRASH_LINES = 120
CRASH_CONFIG = """
[server]
listen = "127.0.0.1:8080"
database_url = "sqlite://tidepool.db"

[batch]
poll_interval_ms = 100
lines_in_flight_max = 4

[[models]]
id = "fake-chat"
kind = "chat"
file = "none"
backend = "fake"
fake_decode_step_us = 20000
seqs_max = 16
context_tokens = 2048
price_input_per_mtok = 1_000_000_000
price_output_per_mtok = 2_000_000_000
"""


def test_kill_9_mid_batch_then_restart_answers_and_bills_each_line_once(tmp_path):
    from conftest import Server

    server = Server(tmp_path, CRASH_CONFIG)
    key = server.create_key("crash-batch", "pytest", credit="50")
    server.start()
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0, timeout=60)
    path = tmp_path / "crash.jsonl"
    with path.open("w") as out:
        for i in range(CRASH_LINES):
            out.write(json.dumps({
                "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "fake-chat", "max_tokens": 6,
                         "messages": [{"role": "user", "content": f"line {i}"}]},
            }) + "\n")
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # Kill once a part of the batch is answered (bounded wait).
    deadline = time.monotonic() + 60
    while True:
        batch = client.batches.retrieve(batch.id)
        if batch.request_counts.completed >= 20:
            break
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    assert batch.status == "in_progress"

    server.start()  # recovery voids the lines that were in flight; the runner resumes
    deadline = time.monotonic() + 120
    while batch.status != "completed":
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.request_counts.completed == CRASH_LINES
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"line-{i}" for i in range(CRASH_LINES)]
    raw = _get_json(server, key, f"/v1/batches/{batch.id}")
    server.stop()

    expected = sum(
        (line["response"]["body"]["usage"]["prompt_tokens"] * 500
         + line["response"]["body"]["usage"]["completion_tokens"] * 1000)
        for line in lines
    )
    assert raw["usage"]["cost_nanos"] == expected
    con = sqlite3.connect(f"file:{server.db_path}?mode=ro", uri=True, timeout=10)
    try:
        billed = con.execute(
            "SELECT COUNT(*), SUM(cost_nanos) FROM usage_entries WHERE batch_id = ?", (batch.id,)
        ).fetchone()
        open_holds = con.execute("SELECT COUNT(*) FROM reservations WHERE state = 'open'").fetchone()[0]
        balance = con.execute(
            "SELECT balance_nanos FROM accounts WHERE tenant_id = 'crash-batch'"
        ).fetchone()[0]
    finally:
        con.close()
    assert billed == (CRASH_LINES, expected), "each line billed exactly once"
    assert open_holds == 0
    assert balance == 50 * 1_000_000_000 - expected

"""Pay-as-you-go billing seen from outside: the official SDK's view of `insufficient_quota` and of
`x-ratelimit-*` headers, `GET /v1/usage` against the CLI's report, and the crash rule — 200
concurrent streams, `kill -9` of the server mid-flight, restart: every request settled or voided
exactly once, never over-billed, and `balance = credit - sum(costs)` to the nano-unit."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import signal
import sqlite3
import threading
import time
import urllib.request

import openai
import pytest

from conftest import Server

CHAT_MODEL = "smollm2-135m-instruct"


def test_unfunded_tenant_gets_insufficient_quota_from_the_sdk(server):
    key = server.create_key("unfunded", "pytest", credit=None)
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert raised.value.code == "insufficient_quota"
    assert raised.value.response.headers["x-should-retry"] == "false"


def test_rate_limit_headers_reach_the_sdk(server):
    key = server.create_key("limited", "pytest")
    key_id = key.split("-")[1]
    server.cli("rate-limits", "--database-url", server.database_url, "--key-id", key_id, "--rpm", "100", "--tpm", "100000")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100000
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")


def test_usage_endpoint_matches_the_cli_report(server):
    key = server.create_key("reporting", "pytest")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0)
    done = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6
    )
    deadline = time.monotonic() + 30
    while True:  # settlement is asynchronous; bounded wait
        request = urllib.request.Request(
            server.base + "/v1/usage?scope=tenant", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            report = json.load(response)
        rows = [r for r in report["data"] if r["model"] == CHAT_MODEL]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert rows, report
    assert rows[0]["requests"] == 1
    assert rows[0]["completion_tokens"] == done.usage.completion_tokens
    assert rows[0]["cost_nanos"] > 0
    cli = json.loads(
        server.cli("usage", "--database-url", server.database_url, "--tenant", "reporting", "--format", "json")
    )
    cli_rows = [r for r in cli["data"] if r["model"] == CHAT_MODEL]
    assert cli_rows == rows
    csv_lines = server.cli(
        "usage", "--database-url", server.database_url, "--tenant", "reporting", "--format", "csv"
    ).splitlines()
    assert csv_lines[0].startswith("model,requests,")
    assert any(line.startswith(f"{CHAT_MODEL},1,") for line in csv_lines[1:])
    month = time.strftime("%Y-%m", time.gmtime())
    statement = json.loads(server.cli(
        "statement", "--database-url", server.database_url, "--tenant", "reporting", "--month", month, "--format", "json"
    ))
    amounts = [line["amount_nanos"] for line in statement["lines"]]
    assert statement["opening_balance_nanos"] + sum(amounts) == statement["closing_balance_nanos"]
    assert -sum(a for a in amounts if a < 0) == rows[0]["cost_nanos"]
    table = server.cli("statement", "--database-url", server.database_url, "--tenant", "reporting", "--month", month)
    assert table.splitlines()[-1].startswith("closing balance ")


# --------------------------------------------------------------------------------------------
# kill -9

STREAMS = 200
MAX_TOKENS = 400
CREDIT_USD = "50"
CRASH_CONFIG = """
[server]
listen = "127.0.0.1:8080"
database_url = "sqlite://tidepool.db"

[limits]
admission_queue_len_max = 256

[billing]
checkpoint_tokens = 8

[[models]]
id = "fake-chat"
kind = "chat"
file = "none"
backend = "fake"
fake_decode_step_us = 20000
seqs_max = 256
context_tokens = 2048
price_input_per_mtok = 1_000_000_000
price_output_per_mtok = 2_000_000_000
"""


def _stream(port: int, key: str, index: int, received: dict, started: threading.Event) -> None:
    """One streaming request; records its request id and the completion chunks it received
    (the fake engine sends one token per chunk) until the server dies."""
    body = json.dumps({
        "model": "fake-chat",
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": f"stream number {index}"}],
    })
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        response = conn.getresponse()
        received[index] = [response.getheader("x-request-id"), 0, response.status]
        while True:
            line = response.readline()
            if not line:
                break
            if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                received[index][1] += 1
                started.set()
    except (OSError, http.client.HTTPException):
        pass  # the server was killed mid-stream: expected
    finally:
        conn.close()


def _db(server: Server) -> sqlite3.Connection:
    con = sqlite3.connect(f"file:{server.db_path}?mode=ro", uri=True, timeout=10)
    con.row_factory = sqlite3.Row
    return con


def test_kill_9_mid_stream_then_restart_keeps_the_ledger_exact(tmp_path):
    server = Server(tmp_path, CRASH_CONFIG)
    key = server.create_key("crashy", "pytest", credit=CREDIT_USD)
    server.start()
    received: dict[int, list] = {}
    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(max_workers=STREAMS) as pool:
        futures = [pool.submit(_stream, server.port, key, i, received, started) for i in range(STREAMS)]
        # Kill once every stream is admitted and has delivered a few tokens (bounded wait).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            flowing = sum(1 for r in received.values() if r[1] >= 16)
            if flowing == STREAMS:
                break
            time.sleep(0.05)
        assert started.is_set(), server.log()[-3000:]
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=30)
        for future in futures:
            future.result(timeout=60)

    assert len(received) == STREAMS
    assert all(r[2] == 200 for r in received.values()), received
    # Before restart: the crash left reservations open.
    with _db(server) as con:
        open_before = con.execute("SELECT COUNT(*) FROM reservations WHERE state = 'open'").fetchone()[0]
    assert open_before > 0

    server.start()  # start-up recovery runs before the server answers /healthz
    server.stop()

    con = _db(server)
    try:
        ids = [r[0] for r in received.values()]
        assert len(set(ids)) == STREAMS
        states = dict(con.execute("SELECT state, COUNT(*) FROM reservations GROUP BY state").fetchall())
        assert states.get("open", 0) == 0, states
        assert sum(states.values()) == STREAMS
        entries = {
            row["request_id"]: row
            for row in con.execute("SELECT * FROM usage_entries WHERE tenant_id = 'crashy'")
        }
        # Every request id exactly once (the primary key), every admitted request resolved.
        assert set(ids) <= set(entries)
        settled_from_checkpoint = 0
        for index, (request_id, chunks, _) in received.items():
            entry = entries[request_id]
            assert entry["status"] == "error" and entry["error_code"] == "interrupted", dict(entry)
            # Never over-billed: at most what was handed to the connection, which is at most
            # what the client read plus what was in flight when the process died.
            assert entry["completion_tokens"] <= MAX_TOKENS
            assert entry["completion_tokens"] <= chunks + 16, (chunks, dict(entry))
            if entry["completion_tokens"] > 0:
                settled_from_checkpoint += 1
                assert entry["cost_nanos"] == entry["prompt_tokens"] * 1000 + entry["completion_tokens"] * 2000
            else:
                assert entry["cost_nanos"] == 0
        assert settled_from_checkpoint > 0
        credit = int(CREDIT_USD) * 1_000_000_000
        balance, reserved = con.execute(
            "SELECT balance_nanos, reserved_nanos FROM accounts WHERE tenant_id = 'crashy'"
        ).fetchone()
        spent = con.execute(
            "SELECT COALESCE(SUM(cost_nanos), 0) FROM usage_entries WHERE tenant_id = 'crashy'"
        ).fetchone()[0]
        assert reserved == 0
        assert balance == credit - spent
        delivered = sum(r[1] for r in received.values())
        billed = sum(e["completion_tokens"] for e in entries.values())
        print(f"kill -9: {open_before} open reservations at the crash; {settled_from_checkpoint} settled "
              f"from checkpoints, {STREAMS - settled_from_checkpoint} voided; completion tokens "
              f"read by clients {delivered}, billed {billed}")
    finally:
        con.close()

"""Upstream mode against an outside engine: llama-cpp-python's OpenAI-compatible server
(`python -m llama_cpp.server`, pinned in the Makefile's `venv-llamacpp`) serves SmolLM2, and a
Tidepool gateway treats it as an `upstream` backend. Through the gateway with the official SDK:
a chat completion and a stream give the upstream's own answer and token counts, and the
gateway's ledger bills exactly those counts.

The interpreter with llama-cpp-python is `TIDEPOOL_LLAMA_CPP_PYTHON` (set by `make python-test`);
without it the test is skipped with the reason (e.g. a machine where the wheel cannot build)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from conftest import MODELS_DIR, Server, _free_port

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# `/v1/backends` is the operator's (docs/access.md).
ADMIN_TOKEN = "python-tests-admin-token"
UPSTREAM_KEY = "upstream-secret-key-for-tests"
STARTUP_S_MAX = 180
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


def _llama_cpp_python() -> str:
    python = os.environ.get("TIDEPOOL_LLAMA_CPP_PYTHON", "")
    if not python or not Path(python).exists():
        pytest.skip("TIDEPOOL_LLAMA_CPP_PYTHON is not set (llama-cpp-python not installed)")
    return python


@pytest.fixture(scope="module")
def llama_cpp_server(tmp_path_factory):
    python = _llama_cpp_python()
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama-cpp") / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [python, "-m", "llama_cpp.server", "--model", str(MODELS_DIR / MODEL_FILE),
         "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "2048", "--n_threads", "2", "--api_key", UPSTREAM_KEY,
         # By default llama-cpp-python cuts a running stream short (`[DONE]` without a finish
         # reason) whenever another request waits for its lock, and the gateway's health probe
         # (`GET /v1/models`) takes that lock: the gateway would see every such stream fail.
         "--interrupt_requests", "False"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S_MAX
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited:\n{log_path.read_text()[-4000:]}")
        try:
            request = urllib.request.Request(
                base + "/v1/models", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"})
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("llama_cpp.server did not start")
        time.sleep(0.5)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, llama_cpp_server):
    config = f"""[server]
listen = "127.0.0.1:8080"
database_url = "sqlite://tidepool.db"
region = "eu"

[[models]]
id = "smol-upstream"
kind = "chat"
backend = "remote"
price_input_per_mtok = 1_000_000_000
price_output_per_mtok = 2_000_000_000

[[backends]]
id = "llama-cpp-python"
kind = "upstream"
url = "{llama_cpp_server}"
region = "eu"
api_key_env = "TP_TEST_LLAMA_CPP_KEY"
models = ["smol-upstream"]
aliases = {{ smol-upstream = "smollm2" }}
timeout_ms = 120000
concurrency_max = 2
"""
    srv = Server(tmp_path_factory.mktemp("gateway"), config)
    srv.env["TP_TEST_LLAMA_CPP_KEY"] = UPSTREAM_KEY
    srv.env["TIDEPOOL_ADMIN_TOKEN"] = ADMIN_TOKEN
    srv.env["RUST_LOG"] = "info,tidepool_gateway::backends=debug"
    srv.start()
    yield srv
    srv.stop()


def _clients(llama_cpp_server: str, gateway: Server):
    direct = openai.OpenAI(base_url=llama_cpp_server + "/v1", api_key=UPSTREAM_KEY,
                           max_retries=0, timeout=300)
    via = openai.OpenAI(base_url=gateway.base + "/v1", api_key=gateway.create_key("acme", "lcp"),
                        max_retries=0, timeout=300)
    return direct, via


def test_llama_cpp_python_upstream_answers_and_is_metered(llama_cpp_server, gateway):
    direct, via = _clients(llama_cpp_server, gateway)
    reference = direct.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=12, temperature=0)
    assert reference.choices[0].message.content

    raw = via.chat.completions.with_raw_response.create(
        model="smol-upstream", messages=MESSAGES, max_tokens=12, temperature=0)
    answer = raw.parse()
    assert answer.model == "smol-upstream"
    assert answer.choices[0].message.content == reference.choices[0].message.content
    assert answer.usage.prompt_tokens == reference.usage.prompt_tokens
    assert answer.usage.completion_tokens == reference.usage.completion_tokens
    row = gateway.usage_row(raw.headers["x-request-id"])
    assert row is not None and row["status"] == "ok", row
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        reference.usage.prompt_tokens, reference.usage.completion_tokens)
    # The backend's key never shows on the gateway's API or in its log.
    with urllib.request.urlopen(urllib.request.Request(
            gateway.base + "/v1/backends",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})) as response:
        listing = response.read().decode()
    assert "llama-cpp-python" in listing and UPSTREAM_KEY not in listing
    assert UPSTREAM_KEY not in gateway.log()


def test_llama_cpp_python_upstream_streams_token_by_token(llama_cpp_server, gateway):
    direct, via = _clients(llama_cpp_server, gateway)
    reference = direct.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=12, temperature=0)
    raw = via.chat.completions.with_raw_response.create(
        model="smol-upstream", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})
    stream = raw.parse()
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == reference.choices[0].message.content
    assert len(pieces) > 1, "the stream arrived in one piece"
    assert usage is not None
    assert usage.completion_tokens == reference.usage.completion_tokens
    # llama-cpp-python reports no usage in a stream: the gateway bills the tokens it delivered
    # and the prompt at the upper bound it reserved (never less than the real count).
    row = gateway.usage_row(raw.headers["x-request-id"])
    assert row is not None and row["status"] == "ok", row
    assert row["completion_tokens"] == reference.usage.completion_tokens
    assert row["prompt_tokens"] >= reference.usage.prompt_tokens

"""Black-box fixtures: start a real `tidepool serve` (real models, a fresh SQLite database in a
temp dir, a free loopback port), create API keys with the real CLI, and hand out official `openai`
SDK clients with retries disabled so a 429 or 5xx can never be hidden by the SDK."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = Path(os.environ.get("TIDEPOOL_MODELS_DIR", Path.home() / ".cache/tidepool/models"))
STARTUP_S_MAX = 300  # model loading on a cold page cache, debug binary with optimised deps


def _bin() -> str:
    path = os.environ.get("TIDEPOOL_BIN")
    if not path:
        pytest.exit("TIDEPOOL_BIN is not set: run `make python-test`", returncode=2)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, config: str | None = None):
        """A server on the repository's tidepool.toml, or on `config` (TOML text with the same
        `listen` and `database_url` lines, which are pointed at this test's port and database)."""
        self.tmp = tmp
        self.port = _free_port()
        self.db_path = tmp / "tidepool.db"
        self.database_url = f"sqlite://{self.db_path}"
        config = config if config is not None else (ROOT / "tidepool.toml").read_text()
        config = config.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{self.port}"')
        config = config.replace('database_url = "sqlite://tidepool.db"', f'database_url = "{self.database_url}"')
        self.config_path = tmp / "tidepool.toml"
        self.config_path.write_text(config)
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "TIDEPOOL_MODELS_DIR": str(MODELS_DIR), "RUST_LOG": "info"}
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [_bin(), *args], env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, f"tidepool {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def create_key(self, tenant: str, name: str, credit: str | None = "100") -> str:
        """A new key for `tenant`; the tenant gets `credit` (whole USD) of prepaid balance."""
        out = self.cli("keys", "create", "--database-url", self.database_url, "--tenant", tenant, "--create-tenant", "--name", name)
        match = re.search(r"\btp-[A-Za-z0-9_-]+", out)
        assert match, f"no key in output: {out!r}"
        if credit is not None:
            self.cli("credit", "add", "--database-url", self.database_url, "--tenant", tenant, credit)
        return match.group(0)

    def start(self) -> None:
        log = open(self.tmp / "server.log", "a")
        self.proc = subprocess.Popen(
            [_bin(), "serve", "--config", str(self.config_path)],
            env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + STARTUP_S_MAX
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{(self.tmp / 'server.log').read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log(self) -> str:
        return (self.tmp / "server.log").read_text()

    def usage_row(self, request_id: str, wait_s: float = 30.0) -> dict | None:
        """The usage row of one request, read straight from the ledger's SQLite file. Waits (bounded)
        because a disconnected stream is settled asynchronously by its guard."""
        deadline = time.monotonic() + wait_s
        while True:
            con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
            con.row_factory = sqlite3.Row
            try:
                row = con.execute("SELECT * FROM usage_entries WHERE request_id = ?", (request_id,)).fetchone()
            finally:
                con.close()
            if row is not None or time.monotonic() > deadline:
                return dict(row) if row is not None else None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("tidepool"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def api_key(server) -> str:
    return server.create_key("acme", "pytest")


@pytest.fixture(scope="session")
def client(server, api_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=api_key, max_retries=0, timeout=300)

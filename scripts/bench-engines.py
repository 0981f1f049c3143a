#!/usr/bin/env python3
"""Pooled vs unpooled llama.cpp engine, same binary, same requests, interleaved pass by pass.

Starts two `tidepool serve` processes of one binary on one GGUF: `[pool] enabled = true` (the
default: the model runs in the pool's engine, tidepool-engine's `multi` module) and
`[pool] enabled = false` (one continuous-batching engine per model, the `llama` module). Every
pass runs each workload at each concurrency on both servers, the order alternating by pass, and
each server's figures sum its passes, so a noisy machine's drift falls on both alike. Reported as
unpooled/pooled ratios of the same run.

Workloads (streaming `/v1/completions`, temperature 0, one SSE event per token):
  unique  every prompt unique from its first words (as `tidepool bench engine`): no prefix reuse;
  prefix  one long shared prefix (a document) plus a short unique question: what an engine that
          reuses a cached prompt prefix (the unpooled one does) can skip.

Usage: scripts/bench-engines.py --bin target/release/tidepool [--concurrency 1,4] [--repeats 3]
stdlib only; prints a table and writes a JSON report (--out).
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = ["river", "lantern", "harbour", "quiet", "morning", "stone", "bridge", "garden", "winter",
         "letter", "window", "market", "thunder", "orchard", "voyage", "compass"]


def unique_prompt(number, tokens):
    """As `tidepool bench engine`: unique from its first words, about `tokens` tokens."""
    words = [WORDS[(i * 7 + number * 3) % 16] for i in range(tokens * 10 // 13)]
    return f"Story {number}. Continue this text: " + " ".join(words)


def prefix_prompt(number, tokens):
    """One shared document of about `tokens` tokens, then a short unique question."""
    words = [WORDS[(i * 5) % 16] for i in range(tokens * 10 // 13)]
    return "Document: " + " ".join(words) + f"\nQuestion {number}: which word comes after the {number % 97}th?"


WORKLOADS = {"unique": unique_prompt, "prefix": prefix_prompt}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, model, pooled, seqs_max, threads, work):
        self.name = "pooled" if pooled else "unpooled"
        self.port = free_port()
        work = Path(work) / self.name
        work.mkdir(parents=True)
        db = f"sqlite://{work / 'bench.db'}"
        config = work / "bench.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\ndatabase_url = "{db}"\n\n'
            f"[engine]\nthreads = {threads}\n\n"
            f"[pool]\nenabled = {'true' if pooled else 'false'}\n\n"
            f'[[models]]\nid = "smollm2"\nkind = "chat"\nfile = "{model}"\n'
            f"context_tokens = 2048\nseqs_max = {seqs_max}\n"
        )
        out = subprocess.run(
            [binary, "keys", "create", "--database-url", db, "--tenant", "bench", "--name", "bench"],
            check=True, capture_output=True, text=True,
        ).stdout
        self.key = next(w for w in out.split() if w.startswith("tp-"))
        self.log = open(work / "serve.log", "w")
        self.child = subprocess.Popen([binary, "serve", "--config", str(config)],
                                      stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.child.poll() is not None:
                sys.exit(f"{self.name} server exited at start-up; see {work / 'serve.log'}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        sys.exit(f"{self.name} server not healthy within 300 s")

    def stream(self, prompt, max_tokens, samples):
        """One streaming completion; appends TTFT and inter-token gaps (ms), counts tokens."""
        body = json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0, "stream": True})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        sent = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {response.status}: {response.read()[:300]!r}")
        last = None
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            try:
                text = json.loads(line[6:])["choices"][0].get("text") or ""
            except (ValueError, KeyError, IndexError):
                continue
            if not text:
                continue
            now = time.perf_counter()
            if last is None:
                samples["ttft_ms"].append((now - sent) * 1000)
            else:
                samples["itl_ms"].append((now - last) * 1000)
            last = now
            samples["tokens"] += 1
        samples["requests"] += 1
        conn.close()

    def stop(self):
        self.child.kill()
        self.child.wait()
        self.log.close()


def new_samples():
    return {"requests": 0, "tokens": 0, "wall_s": 0.0, "ttft_ms": [], "itl_ms": []}


def level(server, workload, concurrency, pass_no, args):
    """`concurrency` streams, each sending its rounds in a row; the level's wall time as a whole."""
    rounds = max(args.rounds, -(-args.requests_min // concurrency))
    results = [new_samples() for _ in range(concurrency)]
    errors = []

    def run(stream):
        try:
            for r in range(rounds):
                number = pass_no * 10_000_000 + concurrency * 100_000 + r * 1000 + stream
                server.stream(WORKLOADS[workload](number, args.prompt_tokens), args.output_tokens,
                              results[stream])
        except Exception as error:  # reported after the level
            errors.append(error)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(s,)) for s in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    total = new_samples()
    total["wall_s"] = time.perf_counter() - start
    for s in results:
        for k in ("requests", "tokens"):
            total[k] += s[k]
        total["ttft_ms"] += s["ttft_ms"]
        total["itl_ms"] += s["itl_ms"]
    return total


def pct(values, p):
    if not values:
        return 0.0
    values = sorted(values)
    rank = min(max(-(-p * len(values) // 100), 1), len(values))
    return values[rank - 1]


def summary(s):
    return {
        "requests": s["requests"], "tokens": s["tokens"], "wall_s": round(s["wall_s"], 3),
        "tokens_per_s": round(s["tokens"] / s["wall_s"], 2) if s["wall_s"] else 0.0,
        "requests_per_s": round(s["requests"] / s["wall_s"], 3) if s["wall_s"] else 0.0,
        "ttft_ms_p50": round(pct(s["ttft_ms"], 50), 1), "ttft_ms_p99": round(pct(s["ttft_ms"], 99), 1),
        "itl_ms_p50": round(pct(s["itl_ms"], 50), 2), "itl_ms_p99": round(pct(s["itl_ms"], 99), 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True)
    parser.add_argument("--model", default=str(Path(os.environ.get(
        "TIDEPOOL_MODELS_DIR", Path.home() / ".cache/tidepool/models")) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--workloads", default="unique,prefix")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests-min", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0,
                        help="[engine] threads of both servers (0: all cores). 1 keeps a shared "
                             "machine's other work from stalling a multi-threaded step")
    parser.add_argument("--out", default="bench/out/engines.json")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    work = tempfile.mkdtemp(prefix="tidepool-bench-engines-")
    servers = [Server(args.bin, args.model, pooled, max(levels), args.threads, work) for pooled in (True, False)]
    sums = {}
    try:
        for server in servers:  # one untimed request each: the pool loads its model lazily
            server.stream(unique_prompt(4_000_000_000, args.prompt_tokens), 8, new_samples())
        for p in range(args.repeats):
            for workload in workloads:
                for c in levels:
                    order = servers if p % 2 == 0 else servers[::-1]
                    for server in order:
                        s = level(server, workload, c, p, args)
                        print(f"pass {p} {workload:<6} c={c:<2} {server.name:<8} "
                              f"{s['tokens'] / s['wall_s']:7.1f} tok/s", flush=True)
                        acc = sums.setdefault((workload, c, server.name), new_samples())
                        for k in ("requests", "tokens", "wall_s"):
                            acc[k] += s[k]
                        acc["ttft_ms"] += s["ttft_ms"]
                        acc["itl_ms"] += s["itl_ms"]
    finally:
        for server in servers:
            server.stop()
    report = {"model": Path(args.model).name, "threads": args.threads,
              "prompt_tokens": args.prompt_tokens,
              "output_tokens": args.output_tokens, "repeats": args.repeats, "levels": []}
    print("\n| workload | streams | tok/s pooled / unpooled | unpooled/pooled tok/s "
          "| req/s unpooled/pooled | TTFT p50 ms pooled / unpooled | ITL p50 ms pooled / unpooled |")
    print("|---|---|---|---|---|---|---|")
    for workload in workloads:
        for c in levels:
            pooled = summary(sums[(workload, c, "pooled")])
            unpooled = summary(sums[(workload, c, "unpooled")])
            ratio = unpooled["tokens_per_s"] / pooled["tokens_per_s"] if pooled["tokens_per_s"] else 0.0
            req_ratio = (unpooled["requests_per_s"] / pooled["requests_per_s"]
                         if pooled["requests_per_s"] else 0.0)
            report["levels"].append({"workload": workload, "concurrency": c, "pooled": pooled,
                                     "unpooled": unpooled,
                                     "unpooled_over_pooled_tokens_per_s": round(ratio, 3),
                                     "unpooled_over_pooled_requests_per_s": round(req_ratio, 3)})
            print(f"| {workload} | {c} | {pooled['tokens_per_s']:.1f} / {unpooled['tokens_per_s']:.1f} "
                  f"| {ratio:.2f}x | {req_ratio:.2f}x "
                  f"| {pooled['ttft_ms_p50']:.0f} / {unpooled['ttft_ms_p50']:.0f} "
                  f"| {pooled['itl_ms_p50']:.1f} / {unpooled['itl_ms_p50']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.repeats} passes, servers interleaved; report written to {args.out}")


if __name__ == "__main__":
    main()

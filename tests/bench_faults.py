"""Fault benchmark: a mixed load on a 3-node fake fleet while one node is killed and another
starts answering 500. Counts how each request ended.

    python tests/bench_faults.py              # 300 requests, about 30 s
    python tests/bench_faults.py --requests 600 --seed 7

Every process runs on loopback: three fake Ollama nodes and herd, each in its own process; the
client runs here. Target: no request fails that had not started streaming; a stream that breaks
ends with an error in its API's shape; trace rows equal requests.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import urllib3

from bench_common import free_port, start_fake, start_herd, stop, wait_nodes

PARALLEL = 8


def request_for(rng):
    """A random request of the mix: (path, body, kind)."""
    roll = rng.random()
    messages = [{"role": "user", "content": "tell me something"}]
    if roll < 0.3:
        return "/api/chat", {"model": "llama3.2", "messages": messages}, "ollama-stream"
    if roll < 0.5:
        return "/api/generate", {"model": "llama3.2", "prompt": "hi", "stream": False}, "ollama"
    if roll < 0.7:
        return "/v1/chat/completions", {"model": "llama3.2", "messages": messages, "stream": True}, "openai-stream"
    if roll < 0.85:
        return "/v1/chat/completions", {"model": "llama3.2", "messages": messages}, "openai"
    return "/api/embed", {"model": "nomic-embed-text", "input": ["a", "b"]}, "ollama"


def classify(kind, status, data):
    """ok | failed-before-stream | broke-mid-stream (proper error) | malformed."""
    if status != 200:
        return "failed-before-stream"
    text = data.decode("utf-8", "replace")
    if kind == "ollama-stream":
        last = json.loads([line for line in text.splitlines() if line][-1])
        if last.get("error"):
            return "broke-mid-stream"
        return "ok" if last.get("done") else "malformed"
    if kind == "openai-stream":
        events = [e for e in text.split("\n\n") if e.strip()]
        if events[-1].strip() == "data: [DONE]":
            return "ok"
        last = json.loads(events[-1].removeprefix("data: "))
        ok = isinstance(last.get("error"), dict) and {"message", "type", "code"} <= set(last["error"])
        return "broke-mid-stream" if ok else "malformed"
    json.loads(data)
    return "ok"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    plan = [request_for(rng) for _ in range(args.requests)]
    data_dir = Path(tempfile.mkdtemp(prefix="herd-faults-"))
    ports, router_port = [free_port() for _ in range(3)], free_port()
    base = f"http://127.0.0.1:{router_port}"
    fakes, procs = [], []
    try:
        for port in ports:
            fakes.append(start_fake(port, models=("llama3.2", "nomic-embed-text"), tokens=20, token_delay=0.02))
            procs.append(fakes[-1])
        procs.append(start_herd(router_port, data_dir, [(f"n{i}", f"http://127.0.0.1:{port}")
                                                        for i, port in enumerate(ports)],
                                flags=["--parallel", PARALLEL]))
        wait_nodes(base, 3)
        pool = urllib3.PoolManager(maxsize=args.concurrency, timeout=urllib3.Timeout(connect=5, read=120))
        results = []
        lock = threading.Lock()
        cursor = iter(range(len(plan)))

        def worker():
            for index in cursor:
                path, body, kind = plan[index]
                try:
                    response = pool.request("POST", base + path, body=json.dumps(body).encode(),
                                            headers={"Content-Type": "application/json"}, retries=False)
                    outcome = classify(kind, response.status, response.data)
                    detail = response.data[:160] if outcome != "ok" else b""
                except Exception as exc:  # noqa: BLE001 - count every way a request can end
                    outcome, detail = "client-error", repr(exc).encode()
                with lock:
                    results.append((kind, outcome, detail))

        def faults():
            while len(results) < args.requests // 3:
                time.sleep(0.02)
            fakes[0].send_signal(signal.SIGKILL)
            print(f"after {len(results)} requests: killed node n0 (SIGKILL)")
            while len(results) < args.requests // 2:
                time.sleep(0.02)
            urllib3.request("POST", f"http://127.0.0.1:{ports[1]}/_fake/control",
                            body=json.dumps({"fail": {"count": 1_000_000, "status": 500}}).encode())
            print(f"after {len(results)} requests: node n1 answers 500 to everything")

        started = time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        threads.append(threading.Thread(target=faults))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    finally:
        stop(procs)

    with sqlite3.connect(data_dir / "latency.db") as db:
        rows = db.execute("SELECT COUNT(*) FROM request_traces").fetchone()[0]
        by_status = dict(db.execute("SELECT status, COUNT(*) FROM request_traces GROUP BY status"))
        retried = db.execute("SELECT COUNT(*) FROM request_traces WHERE retry_count > 0").fetchone()[0]
        by_node = dict(db.execute("SELECT node_id, COUNT(*) FROM request_traces GROUP BY node_id"))
    outcomes = collections.Counter(outcome for _, outcome, _ in results)
    print(f"{len(results)} requests ({collections.Counter(k for k, _, _ in results)}) in {elapsed:.1f} s, "
          f"concurrency {args.concurrency}, seed {args.seed}")
    print(f"client outcomes: {dict(outcomes)}")
    print(f"trace rows: {rows} (status {by_status}); retried invisibly: {retried}; served by {by_node}")
    for kind, outcome, detail in results:
        if outcome not in ("ok", "broke-mid-stream"):
            print(f"  {kind} {outcome}: {detail!r}")
    ok = (outcomes["failed-before-stream"] == 0 and outcomes["malformed"] == 0 and outcomes["client-error"] == 0
          and rows == len(results))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

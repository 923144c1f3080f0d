"""Soak: mixed traffic with faults for a long while, then SIGTERM; nothing lost, nothing leaking.

    python tests/bench_soak.py                 # 10 minutes
    python tests/bench_soak.py --seconds 60    # what CI runs (tests/test_soak.py)

Three fake Ollama nodes and herd run in processes of their own on 127.0.0.1. Clients send a mix of
Ollama and OpenAI requests (chat, generate, embed; streaming and not), some of them bodies herd
must refuse, and some streams the client abandons half way. Meanwhile, in turn, a node is
restarted, answers 500 for a while, hangs before its first byte, or drops streams mid-way. At the
end herd gets SIGTERM. The run passes when herd exits 0, every request sent has exactly one trace
row, and herd's memory (RSS), threads and open file descriptors after the run are where they were
after the warm-up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import urllib3

from bench_common import free_port, start_fake, start_herd, wait_nodes

MODELS = ("llama3.2", "qwen2.5:7b", "nomic-embed-text")
CLIENTS = 12
WARM_UP_SHARE = 0.2  # the first fifth of the run fills pools and caches: counts start after it
FAULT_EVERY_S = 5.0
# How much may grow between the end of the warm-up and the end of the run.
RSS_GROWTH_MB = 20
THREAD_GROWTH = 4
FD_GROWTH = 16
REQUESTS = [
    ("/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ("/api/chat", {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("/api/generate", {"model": "llama3.2", "prompt": "hi"}),
    ("/api/embed", {"model": "nomic-embed-text", "input": ["a", "b"]}),
    ("/v1/chat/completions", {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ("/v1/embeddings", {"model": "nomic-embed-text", "input": "hello"}),
]
BAD_BODIES = [b"{not json", b'{"model": 5}', b'{"model": "llama3.2", "messages": "hi"}',
              b'{"model": "llama3.2", "options": {"num_ctx": "big"}}', b"[" * 200 + b"]" * 200]


class Soak:
    def __init__(self, seconds, seed):
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.data_dir = Path(tempfile.mkdtemp(prefix="herd-soak-"))
        self.ports = [free_port() for _ in range(3)]
        self.nodes = [self._start_node(port) for port in self.ports]
        self.herd_port = free_port()
        self.base = f"http://127.0.0.1:{self.herd_port}"
        self.herd = start_herd(self.herd_port, self.data_dir,
                               nodes=[(f"n{i}", f"http://127.0.0.1:{p}") for i, p in enumerate(self.ports)],
                               flags=["--poll-interval", "0.5", "--first-byte-timeout", "2", "--queue-timeout", "30",
                                      "--drain-timeout", "10", "--threads", "64"])
        wait_nodes(self.base, 3)
        self.pool = urllib3.PoolManager(maxsize=CLIENTS * 2, timeout=urllib3.Timeout(connect=5, read=60),
                                        retries=False)
        self.lock = threading.Lock()
        self.sent = 0
        self.outcomes = {}
        self.faults = []
        self.stop = threading.Event()

    def _start_node(self, port):
        return start_fake(port, models=MODELS, loaded=MODELS, tokens=8, token_delay=0.01)

    # -- traffic ------------------------------------------------------------------------------

    def client(self, index):
        rng = random.Random(index)
        while not self.stop.is_set():
            roll = rng.random()
            if roll < 0.1:
                outcome = self.send(rng.choice(("/api/chat", "/v1/chat/completions")), rng.choice(BAD_BODIES))
            elif roll < 0.15:
                outcome = self.abandon_stream()
            else:
                path, body = rng.choice(REQUESTS)
                outcome = self.send(path, json.dumps(body).encode())
            with self.lock:
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def send(self, path, body):
        with self.lock:
            self.sent += 1
        try:
            response = self.pool.request("POST", self.base + path, body=body,
                                         headers={"Content-Type": "application/json"})
        except urllib3.exceptions.HTTPError as exc:
            return f"transport error {type(exc).__name__}"
        if response.status == 200 and b'"error"' in response.data[-400:]:
            return "200 ended with an error chunk"
        return str(response.status)

    def abandon_stream(self):
        """A client that reads a chunk of a stream and hangs up."""
        with self.lock:
            self.sent += 1
        try:
            response = self.pool.request("POST", self.base + "/api/chat", preload_content=False,
                                         body=json.dumps(REQUESTS[0][1]).encode(),
                                         headers={"Content-Type": "application/json"})
            response.read(16)
            response.close()
        except urllib3.exceptions.HTTPError as exc:
            return f"transport error {type(exc).__name__}"
        return "abandoned"

    # -- faults -------------------------------------------------------------------------------

    def control(self, index, **changes):
        try:
            urllib3.request("POST", f"http://127.0.0.1:{self.ports[index]}/_fake/control",
                            body=json.dumps(changes).encode(), timeout=5, retries=False)
        except urllib3.exceptions.HTTPError:
            pass

    def injector(self):
        kinds = itertools.cycle(("restart", "errors", "hang", "cut streams"))
        while not self.stop.wait(FAULT_EVERY_S):
            kind, index = next(kinds), self.rng.randrange(3)
            self.faults.append(kind)
            if kind == "restart":
                self.nodes[index].kill()
                self.nodes[index].wait()
                time.sleep(1.0)
                self.nodes[index] = self._start_node(self.ports[index])
            elif kind == "errors":
                self.control(index, fail={"count": 20, "status": 500})
            elif kind == "hang":
                self.control(index, first_byte_delay=3.0)
                self.stop.wait(2.0)
                self.control(index, first_byte_delay=0.0)
            else:
                self.control(index, die_after_chunks=2)
                self.stop.wait(2.0)
                self.control(index, die_after_chunks=None)

    # -- the run ------------------------------------------------------------------------------

    def footprint(self):
        process = psutil.Process(self.herd.pid)
        return {"rss_mb": process.memory_info().rss / 1024 ** 2, "threads": process.num_threads(),
                "fds": process.num_fds() if hasattr(process, "num_fds") else process.num_handles()}

    def run(self):
        threads = [threading.Thread(target=self.client, args=(i,)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=self.injector))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(self.seconds * WARM_UP_SHARE)
        after_warm_up = self.footprint()
        time.sleep(max(0.0, started + self.seconds - time.monotonic()))
        self.stop.set()
        for thread in threads:
            thread.join()
        time.sleep(1.0)  # requests cut by the last fault settle
        at_end = self.footprint()
        self.herd.terminate()
        exit_code = self.herd.wait(timeout=60)
        for node in self.nodes:
            node.kill()
        with sqlite3.connect(self.data_dir / "latency.db") as db:
            rows = db.execute("SELECT COUNT(*) FROM request_traces").fetchone()[0]
            statuses = dict(db.execute("SELECT status, COUNT(*) FROM request_traces GROUP BY status"))
        return {"seconds": self.seconds, "requests": self.sent, "rows": rows, "row_statuses": statuses,
                "answers": dict(sorted(self.outcomes.items())), "faults": len(self.faults),
                "fault_kinds": {k: self.faults.count(k) for k in sorted(set(self.faults))},
                "after_warm_up": after_warm_up, "at_end": at_end, "exit_code": exit_code}


def verdict(result):
    """What failed, as sentences; empty when the run passed."""
    start, end = result["after_warm_up"], result["at_end"]
    problems = []
    if result["exit_code"] != 0:
        problems.append(f"herd exited {result['exit_code']} on SIGTERM")
    if result["rows"] != result["requests"]:
        problems.append(f"{result['requests']} requests but {result['rows']} trace rows")
    if end["rss_mb"] - start["rss_mb"] > RSS_GROWTH_MB:
        problems.append(f"RSS grew {start['rss_mb']:.0f} -> {end['rss_mb']:.0f} MB")
    if end["threads"] - start["threads"] > THREAD_GROWTH:
        problems.append(f"threads grew {start['threads']} -> {end['threads']}")
    if end["fds"] - start["fds"] > FD_GROWTH:
        problems.append(f"file descriptors grew {start['fds']} -> {end['fds']}")
    if any(answer.startswith(("5", "transport")) for answer in result["answers"]):
        problems.append(f"answers included {result['answers']}")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = Soak(args.seconds, args.seed).run()
    print(json.dumps(result, indent=2))
    problems = verdict(result)
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return result, problems


if __name__ == "__main__":
    sys.exit(1 if main()[1] else 0)

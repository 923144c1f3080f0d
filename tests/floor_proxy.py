"""The floor: a bare pass-through proxy on herd's stack and nothing else, so that a benchmark can
tell what herd costs from what Flask, Waitress, urllib3 and sqlite3 cost any router built on them.

    python tests/floor_proxy.py --port 11436 --node http://127.0.0.1:11501 [--node URL ...] --data-dir D

Per request it does what every router on this stack must do and no more: parse the JSON body,
send the raw body to the node with the fewest requests in flight through one shared urllib3
pool, read the node's status and first chunk before answering, relay the rest chunk by chunk,
and queue one trace row for a writer thread. It serves with herd's Waitress settings
(herd.py, make_server), copied here rather than imported so that nothing of herd runs.
No admission, scoring, retries, watchdog or fleet state.
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import urllib3
import waitress
from flask import Flask, Response, request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# herd's own helpers for what any proxy on this stack must do alike: read the node's bytes as they
# come, and leave out the headers Waitress frames itself (importing them runs nothing of herd)
from herd import HOP_BY_HOP, upstream_chunks  # noqa: E402

# -- settings: herd's defaults -----------------------------------------------------------------

THREADS = 768  # herd's DEFAULT_THREADS
MB = 1024 * 1024
MAX_BODY_MB = 64.0  # herd's max_body_mb
CONNECT_TIMEOUT_S = 3.0  # herd's connect_timeout
READ_TIMEOUT_S = 630.0  # herd's backstop: max(first_byte_timeout, stall_timeout) + 30
ENDPOINTS = ("/api/chat", "/api/generate", "/v1/chat/completions")
TRACE_BATCH = 500  # rows per transaction, as herd's TraceStore
TRACE_QUEUE = 100_000


# -- trace rows --------------------------------------------------------------------------------

class TraceWriter:
    """latency.db's one writer: request threads queue rows, a thread commits them in batches."""

    COLUMNS = ("request_id", "timestamp", "model", "node", "status", "latency_ms", "ttft_ms")

    def __init__(self, path):
        self.path = path
        self.queue = queue.Queue(maxsize=TRACE_QUEUE)
        db = self._connect()
        with db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"CREATE TABLE IF NOT EXISTS request_traces ({', '.join(self.COLUMNS)})")
        db.close()
        self.insert = (f"INSERT INTO request_traces ({', '.join(self.COLUMNS)}) "
                       f"VALUES ({', '.join('?' for _ in self.COLUMNS)})")
        self.thread = threading.Thread(target=self._write_loop, name="floor-traces", daemon=True)
        self.thread.start()

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def record(self, row):
        self.queue.put(row)

    def _write_loop(self):
        db = self._connect()
        while True:
            batch = [self.queue.get()]
            while len(batch) < TRACE_BATCH:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            rows = [row for row in batch if row is not None]
            if rows:
                with db:
                    db.executemany(self.insert, rows)
            if None in batch:
                db.close()
                return

    def close(self):
        """Write every queued row, then stop the writer."""
        self.queue.put(None)
        self.thread.join(timeout=30)


# -- forwarding --------------------------------------------------------------------------------

class FloorProxy:
    """The nodes, their in-flight counts, the upstream pool and the trace writer."""

    def __init__(self, node_urls, traces):
        self.in_flight = {url: 0 for url in node_urls}
        self.lock = threading.Lock()
        self.traces = traces
        self.request_ids = itertools.count(1)
        self.pool = urllib3.PoolManager(maxsize=THREADS, block=False, retries=False,
                                        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S))

    def least_busy(self):
        """The node with the fewest requests in flight, counted as one more."""
        with self.lock:
            node = min(self.in_flight, key=self.in_flight.get)
            self.in_flight[node] += 1
            return node

    def forward(self, endpoint, raw):
        """The Flask response for one request: the node's answer, streamed if the client asked."""
        started = time.perf_counter()
        body = json.loads(raw)
        stream = body.get("stream", not endpoint.startswith("/v1/"))  # Ollama streams unless told not to
        exchange = Exchange(self, started, body.get("model"), self.least_busy())
        try:
            resp = self.pool.urlopen("POST", exchange.node + endpoint, body=raw,
                                     headers={"Content-Type": "application/json"},
                                     preload_content=False, redirect=False)
            headers = {key: value for key, value in resp.headers.items() if key.lower() not in HOP_BY_HOP}
            if resp.status >= 400 or not stream:
                data = resp.read()
                resp.release_conn()
                exchange.end("completed" if resp.status < 400 else "failed")
                return Response(data, status=resp.status, headers=headers)
            chunks = upstream_chunks(resp)
            first = next(chunks, b"")
        except BaseException:
            exchange.end("failed")
            raise
        exchange.ttft_ms = (time.perf_counter() - exchange.started) * 1000
        headers["X-Accel-Buffering"] = "no"
        return Response(Relay(exchange, resp, first, chunks), status=resp.status, headers=headers,
                        direct_passthrough=True)


class Exchange:
    """One request from the door to its trace row; `end` releases its node and records it."""

    def __init__(self, proxy, started, model, node):
        self.proxy, self.started, self.model, self.node = proxy, started, model, node
        self.request_id = next(proxy.request_ids)
        self.ttft_ms = None

    def end(self, status):
        proxy = self.proxy
        with proxy.lock:
            proxy.in_flight[self.node] -= 1
        latency_ms = (time.perf_counter() - self.started) * 1000
        proxy.traces.record((self.request_id, time.time(), self.model, self.node, status,
                             round(latency_ms, 3), round(self.ttft_ms, 3) if self.ttft_ms is not None else None))


class Relay:
    """A stream from node to client that ends its exchange once: when the node is done, or when
    the server closes it (the client left), even before its first chunk."""

    def __init__(self, exchange, resp, first, chunks):
        self.exchange, self.resp, self.first, self.chunks = exchange, resp, first, chunks
        self.completed = self.closed = False

    def __iter__(self):
        try:
            yield self.first
            yield from self.chunks
            self.completed = True
        finally:
            self.close()

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.completed:
            self.resp.release_conn()
        else:
            self.resp.close()
        self.exchange.end("completed" if self.completed else "incomplete")


# -- HTTP --------------------------------------------------------------------------------------

def create_app(proxy):
    app = Flask(__name__)

    @app.get("/")
    def root():
        return "ok"

    def forwarded(endpoint):
        def view():
            return proxy.forward(endpoint, request.get_data(cache=False))
        view.__name__ = "forward_" + endpoint.strip("/").replace("/", "_")
        return view

    for endpoint in ENDPOINTS:
        app.add_url_rule(endpoint, view_func=forwarded(endpoint), methods=["POST"])
    return app


def make_server(app, port):
    """Waitress with herd's settings (herd.py, make_server)."""
    return waitress.create_server(
        app, host="127.0.0.1", port=port, threads=THREADS, connection_limit=THREADS * 2 + 100,
        asyncore_use_poll=True, channel_request_lookahead=1,
        max_request_body_size=int(MAX_BODY_MB * MB) + MB,
        ident="floor", expose_tracebacks=False, clear_untrusted_proxy_headers=True)


def stop(_signum, _frame):
    """SIGTERM stops the server like Ctrl-C, so queued rows are written before exit."""
    raise SystemExit(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--node", action="append", required=True, help="a node's base URL; repeatable")
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    traces = TraceWriter(args.data_dir / "latency.db")
    server = make_server(create_app(FloorProxy([url.rstrip("/") for url in args.node], traces)), args.port)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    finally:
        traces.close()


if __name__ == "__main__":
    main()

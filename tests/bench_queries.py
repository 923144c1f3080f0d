"""Dashboard query benchmark: how fast does herd answer its dashboard API over a month of traffic?

    python tests/bench_queries.py                  # build (about 1-2 min, cached) then time, ~2 min
    python tests/bench_queries.py --rebuild        # build the cached database again
    python tests/bench_queries.py --profile        # and cProfile each call over the target
    python tests/bench_queries.py --rows 200000 --reps 3

It builds latency.db as herd writes it (schema from herd.TraceStore, retention 31 days) holding
30 days of a home lab's traffic, about 1,000,000 trace rows: four nodes, six models, tagged apps
and untagged clients, a day-and-night and weekday pattern, 2-5% failures, retries, fallbacks,
cold loads after idle gaps, a few hours where one node is flaky, latencies, TTFT and token counts
from each node's speed. Rows are inserted directly (executemany, indexes built afterwards), then
herd's own writer code rolls the hours up (TraceStore._roll_up_hours, timed: what a database
from before rollups costs on its first start). The database is cached under the temp dir, keyed
by --seed and --rows; a rerun copies it and moves its timestamps forward by whole hours so the
data still ends now.

Then a real router runs in this process on 127.0.0.1 with a copy of that data dir and fake Ollama
nodes (tests/fake_ollama.py, processes of their own) named like the traced nodes, and each
dashboard API call is timed over HTTP for ranges of 1 h, 24 h, 7 d and 30 d (?hours=1|24|168|720):
median and max in ms of --reps calls each. Target: every call under 300 ms (median; the max is
shown too). With --profile, each call whose median is over the target is run again directly on
the same router object under cProfile, and its top functions are printed.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import cProfile
import itertools
import json
import math
import pstats
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import herd  # noqa: E402
from bench_common import free_port, start_fake, stop, wait_nodes  # noqa: E402

TARGET_MS = 300.0
RANGES_H = (1, 24, 168, 720)
DAYS = 30
CACHE_DIR = Path(tempfile.gettempdir()) / "herd-bench-queries"
GENERATOR_VERSION = 4  # bump when the generated traffic or herd's rollups change, so cached databases are rebuilt


# -- the home lab the traces come from ---------------------------------------------------------

# model -> (weights GB, kind)
MODELS = {"llama3.2:3b": (2.0, "chat"), "llama3.1:8b": (4.9, "chat"), "gemma3:12b": (8.1, "chat"),
          "qwen2.5-coder:14b": (9.0, "chat"), "qwen2.5:32b": (19.8, "chat"),
          "nomic-embed-text:latest": (0.27, "embed")}
# node -> memory bandwidth GB/s (decode speed = 0.6 x bandwidth / weights GB), prefill/decode
# ratio, load seconds per GB, and the share of each model's requests herd sends it
NODES = {
    "gpu-4090": {"gbs": 1000, "prefill": 15, "load_s_gb": 0.25,
                 "serves": {"llama3.1:8b": 0.55, "gemma3:12b": 0.5, "qwen2.5-coder:14b": 0.85, "qwen2.5:32b": 0.6,
                            "nomic-embed-text:latest": 0.5}},
    "mac-studio": {"gbs": 400, "prefill": 8, "load_s_gb": 0.15,
                   "serves": {"llama3.2:3b": 0.3, "llama3.1:8b": 0.25, "gemma3:12b": 0.5, "qwen2.5-coder:14b": 0.15,
                              "qwen2.5:32b": 0.4}},
    "gpu-3060": {"gbs": 360, "prefill": 15, "load_s_gb": 0.4,
                 "serves": {"llama3.2:3b": 0.5, "llama3.1:8b": 0.2, "nomic-embed-text:latest": 0.35}},
    "nuc": {"gbs": 60, "prefill": 4, "load_s_gb": 0.6,
            "serves": {"llama3.2:3b": 0.2, "nomic-embed-text:latest": 0.15}},
}
INSTALLED_UNUSED = {"gpu-3060": ["mistral:7b"], "nuc": ["phi3:mini"]}  # on disk, never asked for
KEEP_ALIVE_S = 300  # Ollama's default: a model idle longer than this was unloaded
# app -> share of traffic, daily pattern, tags (None: untagged, counted as its client),
# user agent, client address, models (weights), (api, endpoint, stream) mix, median prompt and
# completion tokens
APPS = {
    "open-webui": (0.28, "human", ["open-webui"], "python-httpx/0.27.2", "192.168.1.5",
                   {"llama3.1:8b": 5, "qwen2.5:32b": 2.5, "gemma3:12b": 1.5, "llama3.2:3b": 1},
                   [("ollama", "/api/chat", 1)], 900, 350),
    "continue": (0.18, "workday", ["continue"], "node-fetch/1.0", "192.168.1.31",
                 {"qwen2.5-coder:14b": 8, "llama3.1:8b": 2},
                 [("openai", "/v1/chat/completions", 1), ("openai", "/v1/completions", 1),
                  ("openai", "/v1/completions", 1)], 1800, 60),
    "home-assistant": (0.12, "machine", ["home-assistant"], "HomeAssistant/2024.12", "192.168.1.2",
                       {"llama3.2:3b": 7, "llama3.1:8b": 3}, [("ollama", "/api/chat", 0)], 1500, 60),
    "n8n": (0.08, "machine", ["n8n", "workflows"], "axios/1.7.7", "192.168.1.3",
            {"llama3.1:8b": 1}, [("ollama", "/api/generate", 0)], 600, 300),
    "paperless-ai": (0.05, "human", ["paperless-ai"], "axios/1.6.8", "192.168.1.4",
                     {"llama3.1:8b": 3, "gemma3:12b": 1}, [("ollama", "/api/chat", 0)], 3000, 200),
    "rag-indexer": (0.15, "machine", ["rag-indexer"], "ollama-python/0.4.7", "192.168.1.20",
                    {"nomic-embed-text:latest": 1}, [("ollama", "/api/embed", 0), ("openai", "/v1/embeddings", 0)],
                    400, 0),
    "ollama-python": (0.06, "human", None, "ollama-python/0.4.7", "192.168.1.40",
                      {"llama3.1:8b": 3, "qwen2.5:32b": 1}, [("ollama", "/api/chat", 1), ("ollama", "/api/chat", 0)],
                      700, 400),
    "scripts": (0.05, "machine", None, "python-requests/2.32.3", "192.168.1.23",
                {"llama3.2:3b": 2, "llama3.1:8b": 1}, [("ollama", "/api/generate", 0)], 500, 150),
    "curl": (0.01, "human", None, "curl/8.5.0", "192.168.1.10",
             {"llama3.2:3b": 1, "llama3.1:8b": 1, "qwen2.5:32b": 1}, [("ollama", "/api/generate", 1)], 50, 200),
    "notebook": (0.02, "workday", ["user:alice"], "OpenAI/Python 1.54.4", "10.0.0.7",
                 {"llama3.1:8b": 2, "qwen2.5:32b": 1}, [("openai", "/v1/chat/completions", 1)], 1200, 500),
}
FAILURE_RATE = 0.03  # of requests outside incidents: failed, cancelled, cut or reaped
FAILURE_KINDS, FAILURE_ODDS = ("failed", "cancelled", "incomplete", "reaped"), (0.45, 0.40, 0.12, 0.03)
RETRY_RATE = 0.015  # completed after another node failed before its first byte
FALLBACK_RATE = 0.003  # served by a fallback model
RELOAD_RATE = 0.002  # reloaded for a larger num_ctx
EVICTION_RATE = 0.01  # cold loads of big models pushed out by another one
INCIDENTS = 5  # hours-long spells where one node fails a third of its requests


def daily_weight(kind, when):
    """How busy an app is at `when` (UTC seconds), 0..1: people in the day, machines all the time."""
    hour = when % 86400 / 3600
    day = int(when // 86400 + 3) % 7  # 0 = Monday (1970-01-01 was a Thursday)
    awake = max(0.0, math.sin(math.pi * (hour - 7) / 16)) if 7 <= hour < 23 else 0.0
    if kind == "human":
        return 0.06 + 0.94 * awake
    if kind == "workday":
        return (0.03 + 0.97 * awake) * (1.0 if day < 5 else 0.12)
    return 0.7 + 0.3 * awake


def lognormal(rng, median, sigma):
    return median * math.exp(rng.gauss(0.0, sigma))


class Traffic:
    """Trace rows of the home lab, hour by hour, as tuples in COLUMNS order."""

    COLUMNS = ("request_id", "timestamp", "model", "original_model", "node_id", "status", "latency_ms",
               "time_to_first_token_ms", "prompt_tokens", "completion_tokens", "score", "scores_breakdown",
               "retry_count", "fallback_used", "api", "endpoint", "tags", "client_ip", "error_message", "queue_ms",
               "stream", "events", "user_agent", "apps", "eval_ms", "prompt_eval_ms", "load_ms", "cold_load",
               "reload", "decisions", "internal")

    def __init__(self, seed, rows, start, end):
        self.rng = rng = random.Random(seed)
        self.start, self.end = start, end
        self.apps = list(APPS)
        self.ids = itertools.count(1)
        self.boot = f"{rng.getrandbits(24):06x}"
        self.loaded_at = {}  # (node, model) -> last request time: idle longer than KEEP_ALIVE_S is cold
        self.routes = {model: ([n for n in NODES if model in NODES[n]["serves"]],
                               list(itertools.accumulate(NODES[n]["serves"][model] for n in NODES
                                                         if model in NODES[n]["serves"])))
                       for model in MODELS}
        self.app_models = {app: (list(spec[5]), list(itertools.accumulate(spec[5].values())))
                           for app, spec in APPS.items()}
        self.app_text = {app: (json.dumps(spec[2]) if spec[2] else None,
                               json.dumps(spec[2] or [f"{spec[3].split(' ', 1)[0]} from {spec[4]}"]))
                         for app, spec in APPS.items()}
        hours = range(int(start // 3600), int(end // 3600) + 1)
        total = sum(APPS[app][0] * daily_weight(APPS[app][1], h * 3600 + 1800) for h in hours for app in APPS)
        self.scale = rows / total
        self.incidents = {}  # hour -> flaky node
        for _ in range(INCIDENTS):
            first = rng.randrange(hours.start, hours.stop)
            node = rng.choice(list(NODES))
            for h in range(first, first + rng.randint(1, 4)):
                self.incidents[h] = node
        self.pool = {}  # (model, node, attempts) -> [(score, breakdown, decisions)] to draw from

    def hours(self):
        """(hour start, [row tuple]) for every hour from start to end, rows in time order."""
        rng = self.rng
        for h in range(int(self.start // 3600), int(self.end // 3600) + 1):
            lo, hi = max(h * 3600, self.start), min(h * 3600 + 3600, self.end)
            if hi <= lo:
                continue
            arrivals = []
            for app in self.apps:
                mean = self.scale * APPS[app][0] * daily_weight(APPS[app][1], h * 3600 + 1800) * (hi - lo) / 3600
                count = max(0, round(rng.gauss(mean, math.sqrt(mean)))) if mean > 0 else 0
                arrivals += [(lo + rng.random() * (hi - lo), app) for _ in range(count)]
            arrivals.sort()
            if rng.random() < 0.01:  # herd restarted: request ids start again under a new prefix
                self.boot, self.ids = f"{rng.getrandbits(24):06x}", itertools.count(1)
            busy = daily_weight("human", h * 3600 + 1800) > 0.8
            yield h * 3600, [self.row(when, app, self.incidents.get(h), busy) for when, app in arrivals]

    def pick_node(self, model, avoid=None):
        nodes, cumulative = self.routes[model]
        for _ in range(4):
            node = nodes[bisect.bisect(cumulative, self.rng.random() * cumulative[-1])]
            if node != avoid:
                return node
        return next((n for n in nodes if n != avoid), nodes[0])

    def decision(self, model, node, attempts):
        """A routing decision as herd stores it, from a small pool per model, node and attempts."""
        key = (model, node, attempts)
        pool = self.pool.get(key)
        if pool is None:
            pool = self.pool[key] = [self.make_decision(model, node, attempts) for _ in range(16)]
        return pool[self.rng.randrange(len(pool))]

    def make_decision(self, model, chosen, attempts):
        """(score, breakdown, decisions) as herd.decision_record stores them (estimates it has
        since learned to record, and this one does not make up, are 0)."""
        rng = self.rng
        records, best = [], None
        for _ in range(attempts):
            candidates = []
            for node in self.routes[model][0]:
                seconds = {name: round(rng.uniform(0, 2) * (node != chosen), 3) for name in
                           ("wait", "cold_load", "reload", "slowdown", "eviction", "risk")}
                seconds["service"] = round(rng.uniform(0.3, 6), 3)
                estimate = collections.defaultdict(float, seconds, eta=round(sum(seconds.values()), 3),
                                                   defer=int(rng.random() < 0.02), prompt=round(rng.uniform(0, 1), 3))
                breakdown = {name: round(rng.uniform(0.3, 1.0) * top, 2) for name, top in herd.SIGNAL_RANGES.items()}
                breakdown["queue_depth"] = -breakdown["queue_depth"] / 4
                breakdown["latency_history"] = -breakdown["latency_history"] / 4
                total = round(sum(breakdown.values()) + (20 if node == chosen else 0), 2)
                candidates.append((node, estimate, breakdown, total))
                if node == chosen:
                    best = (total, json.dumps(breakdown))
            excluded = [[n, "model not installed"] for n in NODES if n not in self.routes[model][0]]
            records.append(herd.decision_record({"model": model, "chosen": chosen, "candidates": candidates,
                                                 "excluded": excluded}))
        return best[0], best[1], json.dumps(records)

    def row(self, when, app, flaky, busy):
        rng = self.rng
        _, _, _, agent, address, _, mix, prompt_median, completion_median = APPS[app]
        names, cumulative = self.app_models[app]
        model = names[bisect.bisect(cumulative, rng.random() * cumulative[-1])]
        api, endpoint, stream = mix[rng.randrange(len(mix))]
        tags_text, apps_text = self.app_text[app]
        asked = model
        events = []
        fallback = 0
        if MODELS[model][1] == "chat" and rng.random() < FALLBACK_RATE:
            asked, model, fallback = "qwen2.5:32b", "llama3.1:8b", 1
            events.append({"fallback_model": model})
        node = self.pick_node(model)
        retries = 0
        status = "completed"
        if node == flaky and rng.random() < 0.35:
            if rng.random() < 0.7:
                retries, failed_node, node = 1, node, self.pick_node(model, avoid=node)
                events.append({"failed": failed_node, "reason": "connection refused", "retried": node})
            else:
                status = "failed"
        elif rng.random() < RETRY_RATE:
            retries = 1 + (rng.random() < 0.1)
            failed_node, node = node, self.pick_node(model, avoid=node)
            events.append({"failed": failed_node, "reason": "HTTP 500 before the first byte", "retried": node})
        if status == "completed" and rng.random() < FAILURE_RATE:
            status = rng.choices(FAILURE_KINDS, FAILURE_ODDS)[0]
        size = MODELS[model][0]
        spec = NODES[node]
        decode_tps = 0.6 * spec["gbs"] / size
        prefill_tps = decode_tps * spec["prefill"]
        embed = MODELS[model][1] == "embed"
        prompt_tokens = max(1, int(lognormal(rng, prompt_median, 0.8)))
        completion_tokens = 0 if embed else max(1, int(lognormal(rng, completion_median, 0.7)))
        queue_ms = round(rng.expovariate(1 / 600), 3) if busy and rng.random() < 0.12 else None
        idle = when - self.loaded_at.get((node, model), -1e12)
        reload = int(rng.random() < RELOAD_RATE)
        cold = int(idle > KEEP_ALIVE_S or reload or (size > 8 and rng.random() < EVICTION_RATE))
        load_ms = (800 + size * spec["load_s_gb"] * 1000) * rng.uniform(0.8, 1.3) if cold else rng.uniform(3, 25)
        prompt_ms = prompt_tokens / prefill_tps * 1000 * rng.uniform(0.8, 1.3)
        eval_ms = completion_tokens / decode_tps * 1000 * rng.uniform(0.85, 1.4)
        overhead = rng.uniform(2, 12) + (queue_ms or 0) + retries * rng.uniform(5, 3000)
        ttft = overhead + load_ms + prompt_ms + (eval_ms / completion_tokens if completion_tokens else 0)
        latency = overhead + load_ms + prompt_ms + eval_ms + rng.uniform(0.5, 4)
        error = None
        if status == "failed":
            if rng.random() < 0.1:
                node = None
                error = f"no node can serve {asked} now: every node that has it is resting after failures"
            else:
                error = f"{node} failed before its first byte: connection refused"
            latency, ttft, prompt_tokens, completion_tokens = rng.uniform(2, 40), None, None, None
            prompt_ms = eval_ms = load_ms = None
            cold = reload = 0
        elif status != "completed":
            cut = rng.uniform(0.05, 0.9)
            latency = ttft + eval_ms * cut if stream else latency * cut
            ttft = ttft if stream and latency > ttft else None
            if status == "reaped":
                latency = 600_000 + rng.uniform(0, 500)
            error = {"cancelled": "the client closed the connection",
                     "incomplete": f"{node} closed the stream before its last chunk",
                     "reaped": "no byte for 600 s; reaped"}[status]
            completion_tokens, eval_ms, prompt_ms = None, None, None
        if node is not None and status != "failed":
            self.loaded_at[(node, model)] = when
        if not stream and ttft is not None:
            ttft = latency - rng.uniform(0.2, 2)
        score, breakdown, decisions = self.decision(model, node, retries + 1) if node else (None, None, None)
        return (f"{self.boot}-{next(self.ids)}", round(when, 3), model, asked, node, status, round(latency, 3),
                round(ttft, 3) if ttft is not None else None, prompt_tokens, completion_tokens, score, breakdown,
                retries, fallback, api, endpoint, tags_text, address, error, queue_ms, stream,
                json.dumps(events) if events else None, agent, apps_text,
                round(eval_ms, 3) if eval_ms else None, round(prompt_ms, 3) if prompt_ms else None,
                round(load_ms, 3) if load_ms is not None else None, cold, reload, decisions, 0)


# -- building and caching the database -----------------------------------------------------------

def trace_indexes(db):
    """[(name, CREATE INDEX sql)] of herd's indexes on request_traces."""
    return db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'request_traces' "
                      "AND sql IS NOT NULL").fetchall()


def without_indexes(db, work):
    """Run work(db) with request_traces' indexes dropped, then build them again: seconds to build."""
    indexes = trace_indexes(db)
    for name, _ in indexes:
        db.execute(f"DROP INDEX {name}")
    work(db)
    started = time.perf_counter()
    for _, sql in indexes:
        db.execute(sql)
    db.commit()
    return time.perf_counter() - started


def build(path, seed, rows, days):
    """A fresh latency.db at `path` with `days` of traffic ending now, rolled up; returns its facts."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    store = herd.TraceStore(path, retention_days=days + 1)
    store.close()  # its writer would roll hours up while we insert: this benchmark does it below
    end = time.time()
    traffic = Traffic(seed, rows, end - days * 86400, end)
    insert = (f"INSERT INTO request_traces ({', '.join(Traffic.COLUMNS)}) "
              f"VALUES ({', '.join('?' * len(Traffic.COLUMNS))})")
    facts = {"seed": seed, "rows": rows, "days": days, "version": GENERATOR_VERSION, "built_at": end,
             "written": 0, "statuses": {}, "sample_ids": []}
    timings = {"generate_s": 0.0, "insert_s": 0.0}

    def fill(db):
        batch = []
        clock = time.perf_counter()
        for hour, hour_rows in traffic.hours():
            batch += hour_rows
            if hour_rows and hour % 86400 == 43200:  # one id a day, to look up later
                facts["sample_ids"].append(hour_rows[len(hour_rows) // 2][0])
            if len(batch) >= 50_000:
                timings["generate_s"] += time.perf_counter() - clock
                write(db, batch)
                batch, clock = [], time.perf_counter()
        timings["generate_s"] += time.perf_counter() - clock
        write(db, batch)

    def write(db, batch):
        started = time.perf_counter()
        with db:
            db.executemany(insert, batch)
        timings["insert_s"] += time.perf_counter() - started
        facts["written"] += len(batch)
        for row in batch:
            facts["statuses"][row[5]] = facts["statuses"].get(row[5], 0) + 1

    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-500000")
    timings["index_s"] = without_indexes(db, fill)
    db.close()
    db = store._connect()  # as the writer connects
    started = time.perf_counter()
    while store._roll_up_hours(db):  # the writer does a couple of days a pass, coming back at once
        pass
    timings["roll_up_s"] = time.perf_counter() - started
    facts["rollup_rows"] = db.execute("SELECT COUNT(*) FROM request_rollups").fetchone()[0]
    facts["rolled_until"] = db.execute("SELECT rolled_until FROM rollup_progress").fetchone()[0]
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    facts["timings"] = {key: round(value, 2) for key, value in timings.items()}
    facts["bytes"] = path.stat().st_size
    return facts


def cached_database(seed, rows, days, rebuild):
    """(path, facts) of the cached database for this seed and size, built when missing."""
    folder = CACHE_DIR / f"seed{seed}-rows{rows}-days{days}-v{GENERATOR_VERSION}"
    path, meta = folder / "latency.db", folder / "facts.json"
    if not rebuild and path.exists() and meta.exists():
        facts = json.loads(meta.read_text())
        print(f"cached database {path} ({facts['written']:,} rows, built "
              f"{(time.time() - facts['built_at']) / 3600:.1f} h ago)")
        return path, facts
    print(f"building {path}: {rows:,} rows over {days} days (seed {seed})", flush=True)
    meta.unlink(missing_ok=True)
    facts = build(path, seed, rows, days)
    meta.write_text(json.dumps(facts, indent=1))
    return path, facts


def working_copy(source, facts, data_dir):
    """Copy the cached database into `data_dir`, its times moved forward by the whole hours that
    have passed since it was built (hours stay aligned, so its rollups stay true)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / "latency.db"
    shutil.copyfile(source, target)
    shift = int((time.time() - facts["built_at"]) // 3600) * 3600
    if shift:
        started = time.perf_counter()
        db = sqlite3.connect(target)
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-500000")
        without_indexes(db, lambda db: db.execute("UPDATE request_traces SET timestamp = timestamp + ?", (shift,)))
        with db:
            # through negative hours: moving rows one by one onto hours still held would break the key
            db.execute("UPDATE request_rollups SET hour = -(hour + ?), last_used = last_used + ?", (shift, shift))
            db.execute("UPDATE request_rollups SET hour = -hour")
            db.execute("UPDATE rollup_progress SET rolled_until = rolled_until + ?", (shift,))
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        print(f"moved the copy's times {shift // 3600} h forward in {time.perf_counter() - started:.1f} s")
    return target


# -- the router and the calls timed --------------------------------------------------------------

def start_fleet():
    """Fake Ollama processes named like the traced nodes, with their models installed."""
    fakes, nodes = [], []
    for name, spec in NODES.items():
        port = free_port()
        installed = [f"{m}={MODELS[m][0]}" for m in spec["serves"]]
        installed += [f"{m}=4.1" for m in INSTALLED_UNUSED.get(name, [])]
        fakes.append(start_fake(port, models=installed, loaded=[next(iter(spec["serves"]))]))
        nodes.append((name, f"http://127.0.0.1:{port}"))
    return fakes, nodes


class Router:
    """herd in this process on a free loopback port, over `data_dir`."""

    def __init__(self, data_dir, nodes, days):
        self.config = herd.Config(host="127.0.0.1", port=0, data_dir=data_dir, nodes=nodes, mdns=False, local=False,
                                  threads=16, retention_days=days + 1, log_level="WARNING")
        self.app = herd.create_app(self.config)
        self.herd = self.app.herd
        self.server = herd.make_server(self.app, self.config)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        threading.Thread(target=self.server.run, name="bench-router", daemon=True).start()

    def close(self):
        herd.stop_server(self.server)
        self.herd.traces.close()


def calls(facts):
    """[(label, endpoint, params)] timed for each range."""
    return [("traces", "traces", {"limit": 50}),
            ("traces model=gemma3:12b", "traces", {"limit": 50, "model": "gemma3:12b"}),
            ("traces app=paperless-ai", "traces", {"limit": 50, "app": "paperless-ai"}),
            ("traces/<id>", f"traces/{facts['sample_ids'][len(facts['sample_ids']) // 2]}", {}),
            ("models", "models", {}), ("usage", "usage", {}), ("apps", "apps", {}), ("benchmarks", "benchmarks", {}),
            ("health", "health", {}), ("recommendations", "recommendations", {}),
            ("model-management", "model-management", {})]


def url_of(base, endpoint, params, hours):
    query = "&".join(f"{key}={quote(str(value), safe='')}" for key, value in {**params, "hours": hours}.items())
    return f"{base}/dashboard/api/{quote(endpoint, safe='/')}?{query}"


def time_calls(base, facts, reps):
    """{(label, hours): [ms]}; each rep runs every call once, so caches warm alike."""
    http = urllib3.PoolManager(maxsize=1, retries=False, timeout=120)
    times = {}
    for rep in range(reps):
        for hours in RANGES_H:
            for label, endpoint, params in calls(facts):
                url = url_of(base, endpoint, params, hours)
                started = time.perf_counter()
                resp = http.request("GET", url)
                elapsed = (time.perf_counter() - started) * 1000
                if resp.status != 200:
                    raise RuntimeError(f"GET {url} answered {resp.status}: {resp.data[:300]!r}")
                times.setdefault((label, hours), []).append(elapsed)
        print(f"  rep {rep + 1}/{reps} done", flush=True)
    return times


def range_name(hours):
    return f"{hours} h" if hours < 48 else f"{hours // 24} d"


def rows_in_ranges(path):
    """{hours: trace rows in the last `hours`}."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return {hours: db.execute("SELECT COUNT(*) FROM request_traces WHERE timestamp >= ?",
                                  (time.time() - hours * 3600,)).fetchone()[0] for hours in RANGES_H}


def print_table(times, rows):
    labels = list(dict.fromkeys(label for label, _ in times))
    width = max(map(len, labels)) + 2
    print(f"\nmedian / max ms over {len(next(iter(times.values())))} calls; * median over {TARGET_MS:g} ms, "
          f"! max over it")
    print("range".ljust(width) + "".join(range_name(h).rjust(18) for h in RANGES_H))
    print("rows in range".ljust(width) + "".join(f"{rows[h]:,}".rjust(18) for h in RANGES_H))
    for label in labels:
        cells = []
        for hours in RANGES_H:
            values = times[(label, hours)]
            median, most = statistics.median(values), max(values)
            mark = "*" if median > TARGET_MS else "!" if most > TARGET_MS else " "
            cells.append(f"{median:7.1f} / {most:7.1f}{mark}".rjust(18))
        print(label.ljust(width) + "".join(cells))


# -- profiling: the same analytics, called directly on the router's own objects -------------------

def direct_call(router, endpoint, params):
    """The function behind GET /dashboard/api/<endpoint>, as a callable of (args)."""
    h = router.herd
    if endpoint.startswith("traces/"):
        return lambda args: herd.trace_detail(h.analytics, endpoint.split("/", 1)[1])
    return {"traces": lambda args: herd.recent_traces(h.analytics, args),
            "models": lambda args: herd.model_figures(h.analytics, args),
            "usage": lambda args: herd.usage_figures(h.analytics, args),
            "apps": lambda args: herd.app_figures(h.analytics, args),
            "benchmarks": lambda args: herd.speed_figures(h.analytics, herd.read_range(args)),
            "health": lambda args: herd.health_report(h, args),
            "recommendations": lambda args: herd.recommendations(h, args),
            "model-management": lambda args: herd.model_management(h, args)}[endpoint]


def profile_slow(router, times, facts, top=18):
    for label, endpoint, params in calls(facts):
        for hours in RANGES_H:
            if statistics.median(times[(label, hours)]) <= TARGET_MS:
                continue
            function = direct_call(router, endpoint, params)
            args = {key: str(value) for key, value in {**params, "hours": hours}.items()}
            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.runcall(function, args)
            print(f"\n== {label} ?hours={hours}: {(time.perf_counter() - started) * 1000:.0f} ms called directly "
                  f"(under cProfile)")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(top)


# -- command line --------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rows", type=int, default=1_000_000, help="trace rows over the whole range (about)")
    parser.add_argument("--days", type=int, default=DAYS)
    parser.add_argument("--reps", type=int, default=5, help="calls of each endpoint and range")
    parser.add_argument("--rebuild", action="store_true", help="build the cached database again")
    parser.add_argument("--profile", action="store_true", help="cProfile each call whose median is over the target")
    args = parser.parse_args()

    source, facts = cached_database(args.seed, args.rows, args.days, args.rebuild)
    print(f"database: {facts['written']:,} rows, {facts['rollup_rows']:,} rollup rows, "
          f"{facts['bytes'] / 1e9:.2f} GB; statuses {facts['statuses']}")
    t = facts["timings"]
    print(f"build: generate {t['generate_s']:.1f} s, insert {t['insert_s']:.1f} s, indexes {t['index_s']:.1f} s, "
          f"roll-up of {args.days} days {t['roll_up_s']:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="herd-queries-"))
    fakes, router = [], None
    try:
        rows = rows_in_ranges(working_copy(source, facts, work / "data"))
        fakes, nodes = start_fleet()
        router = Router(work / "data", nodes, args.days)
        wait_nodes(router.url, len(nodes))
        print(f"router on {router.url} sees {len(nodes)} nodes; timing {args.reps} x {len(calls(facts))} calls "
              f"x {len(RANGES_H)} ranges", flush=True)
        times = time_calls(router.url, facts, args.reps)
        print_table(times, rows)
        slow = sorted({label for (label, _), values in times.items() if statistics.median(values) > TARGET_MS})
        print(f"\n{'over ' + str(TARGET_MS) + ' ms: ' + ', '.join(slow) if slow else 'every call under the target'}")
        if args.profile and slow:
            profile_slow(router, times, facts)
        return 1 if slow else 0
    finally:
        if router is not None:
            router.close()
        stop(fakes)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

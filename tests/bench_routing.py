"""Routing benchmark: does herd finish a home lab's requests sooner than the alternatives?

    python tests/bench_routing.py                 # seeds 1 2 3, about 5 minutes
    python tests/bench_routing.py --seeds 4 --routers herd least-connections
    python tests/bench_routing.py --routers herd-agentless    # herd without herd-node, 2 minutes
    python tests/bench_routing.py --generated 20  # 20 generated home labs against the issue's targets, ~15 minutes
    python tests/bench_routing.py --generated 20 --only 7 12  # two of them
    python tests/bench_routing.py --conversations  # issue 14: seeds 1 2 3 with conversations, about 7 minutes
    python tests/bench_routing.py --generated 6 --conversations  # generated labs 1-6 with them, ~15 minutes
    python tests/bench_routing.py --conversations --multiuser-cache  # nodes run OLLAMA_MULTIUSER_CACHE=1

A simulated fleet (tests/sim_ollama.py; machines, models and mix in bench_common.py) of four
unequal machines replays the same seeded,
open-loop workload (Poisson arrivals; small and large chats, embeddings; streaming and not; both
APIs; a few large num_ctx) through three routers:

1. herd (its own process, fed by herd-node agents that report each simulated machine, told its
   memory and slots but not its default context, which herd sees in /api/ps);
2. round-robin over the nodes that have the model (what nginx gives a home lab);
3. least-connections over the nodes that have the model.

Times are simulated seconds (real time x SCALE). The lower bound serves each request alone on the
fastest node that has its model, already loaded.

--generated N replays N home labs drawn from seeds 1..N over wide ranges instead (machines,
models, traffic with bursts and idle gaps, and the simulator's physics: see bench_common.py),
each at an offered load of 0.1-0.5 of its fleet's capacity. Their lower bound also counts the
queueing that no placement avoids (bench_common.queueing_bound says why it is a bound). The report
lists each lab and how the routers did, worst first, the summary against the targets of issue 13,
where herd's time went in the worst lab (from what the simulated nodes recorded per request and
herd's trace rows) and, for the worst three, what herd expected of each node it chose.

--conversations (issue 14, prompt caches) keeps each lab's single requests (numbered so that no
two share a prefix; for a generated lab over the same 300 s window, with its bursts drawn again)
and adds people's conversations and agent loops that resend their whole history with every
request (bench_common.conversations: 3-30 turns 5-60 s apart, half of them opening with one of
two shared 2-8k-token system prompts; agent loops of 5-20 steps 1-5 s apart on a 3-10k-token
prompt). The nodes keep Ollama's per-slot prompt caches, send a reply's first token at once and
evaluate prompts at a rate of their own (tests/sim_ollama.py); each client sends back exactly the
reply its node generated. Routers: herd, herd with its prompt_affinity setting off
(herd-no-affinity, switched off through the dashboard API once it is up), least-connections
(round-robin with --routers). Per lab: follow-ups' mean time to first token (every request of a
conversation or loop after its first), prompt tokens evaluated against the minimum (see
minimum_tokens), single requests' mean and p95, requests per node against their share (see
node_shares), issue 14's targets as PASS/FAIL, and from herd's decisions (the cached tokens and
prompt seconds it expected of every candidate) where its follow-ups lost their prefix; then the
targets over every lab. A conversation's request starts no later than 200 s after the window and
one still running 120 s after that fails; a conversation whose request fails stops there.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import NamedTuple

import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import herd  # noqa: E402
import herd_node  # noqa: E402
from bench_common import (CONTEXT, DURATION_S, FLEET, RATE, SCALE, bounds, classic_lab,  # noqa: E402
                          conversation_lab, conversations, fastest_tps, free_port, generated_lab, lower_bound,
                          mean_p95_p99, pct, sim_node, start_herd, stop, wait_nodes, workload)
from fake_ollama import QuietServer, full_name  # noqa: E402
from sim_ollama import cached_tokens, prompt_text, prompt_tokens  # noqa: E402

HERD_LOG_LEVEL = os.environ.get("HERD_BENCH_LOG", "WARNING")  # DEBUG: every decision's estimates in the log


# -- the two baselines --------------------------------------------------------------------------

class BaselineProxy:
    """A minimal streaming proxy that picks a node with the model by round robin or least connections."""

    def __init__(self, nodes, strategy):
        self.nodes = nodes  # name -> (url, installed models)
        self.strategy = strategy
        self.active = {name: 0 for name in nodes}
        self.turns = {}
        self.lock = threading.Lock()
        self.pool = urllib3.PoolManager(maxsize=64, retries=False, timeout=urllib3.Timeout(connect=5, read=600))
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                model = full_name(json.loads(raw)["model"])
                name = proxy.choose(model)
                try:
                    upstream = proxy.pool.urlopen("POST", proxy.nodes[name][0] + self.path, body=raw,
                                                  headers={"Content-Type": "application/json"},
                                                  preload_content=False)
                    self.send_response(upstream.status)
                    self.send_header("Content-Type", upstream.headers.get("Content-Type", "application/json"))
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("X-Bench-Node", name)
                    self.end_headers()
                    for chunk in upstream.stream(None):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    upstream.release_conn()
                finally:
                    with proxy.lock:
                        proxy.active[name] -= 1

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def choose(self, model):
        with self.lock:
            having = [n for n, (_, models) in self.nodes.items() if model in models]
            if self.strategy == "round-robin":
                turn = self.turns.setdefault(model, itertools.count())
                name = having[next(turn) % len(having)]
            else:
                name = min(having, key=lambda n: (self.active[n], random.random()))
            self.active[name] += 1
            return name

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# -- one run ------------------------------------------------------------------------------------

class Outcome(NamedTuple):
    """How one request went, as its client saw it (sim seconds)."""

    latency: float
    ttft: float
    ok: bool
    stream: bool
    node: str | None  # herd's X-Herd-Node


@dataclass
class RouterRun:
    """One router's run of a workload on fresh simulated nodes."""

    results: list  # Outcome per request of the plan
    stats: dict  # the nodes' counters, summed
    records: list = field(default_factory=list)  # (node, sim_ollama.Record) per request served
    traces: list = field(default_factory=list)  # herd's trace rows (dicts), herd only
    unsent: int = 0  # conversation turns not sent (the run ended first, or an earlier turn failed)
    emptied: list = field(default_factory=list)  # (sim seconds from the start, node, model, cause): slot caches emptied


def start_fleet(lab):
    return {name: sim_node(name, lab=lab) for name in lab.machines}


def reported_gpu(name, machine):
    """The `gpu` block herd-node sends from this machine: nvidia-smi's VRAM on a GPU box, Apple's
    unified memory on the others with a GPU (the classic studio and laptop, the generated macs),
    nothing on a CPU-only one."""
    if not machine.gpu:
        return None
    if machine.offload_gb or name.startswith(("gpu", "rtx")):
        return {"kind": "nvidia", "vram_total_gb": machine.memory_gb, "vram_used_gb": None,
                "gpus": [{"name": "GPU", "vram_total_gb": machine.memory_gb, "vram_used_gb": None}]}
    return {"kind": "apple", "unified": True, "vram_total_gb": machine.memory_gb, "vram_used_gb": None}


class LabAgent(herd_node.Agent):
    """herd-node on a simulated machine: what it reports of the host is the machine's own GPU."""

    def __init__(self, config, gpu):
        super().__init__(config)
        self.gpu = gpu

    def payload(self):
        return dict(super().payload(), gpu=self.gpu)


def start_herd_on(nodes, data_dir, lab, agents=True, flags=()):
    """herd in its own process, fed by a herd-node agent per machine, or (agents=False) polling
    each node itself as `--node` (no memory size, slots or default context: what it sees in /api/ps).
    An agent is told the machine's slots and the memory Ollama may fill there, and reports its GPU."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_herd(port, data_dir, [] if agents else [(name, node.url) for name, node in nodes.items()],
                      flags=["--queue-timeout", "600", *flags], log_level=HERD_LOG_LEVEL)
    agents = [LabAgent(herd_node.AgentConfig(
        router_url=url, ollama_host=node.url, node_id=name, interval=0.5, num_parallel=lab.machines[name].slots,
        memory_gb=lab.machines[name].budget_gb), reported_gpu(name, lab.machines[name])).start()
        for name, node in nodes.items()] if agents else []
    wait_nodes(url, len(nodes), calibrated=True)  # herd times each node once when it joins
    return proc, agents, url


def replay(url, plan, give_up=None, numbered=False):
    """Send each request at its arrival time; returns an Outcome per request. A request still
    running `give_up` sim seconds after the start counts as failed, its latency cut there.
    Numbered requests carry their number in X-Herd-Tags, so herd's trace rows name them."""
    pool = urllib3.PoolManager(maxsize=256, retries=False, timeout=urllib3.Timeout(connect=10, read=900))
    results = [None] * len(plan)
    start = time.monotonic()

    def one(index, path, body, stream, model):
        sent = time.monotonic()
        ttft = None
        headers = {"Content-Type": "application/json"}
        if numbered:
            headers["X-Herd-Tags"] = f"bench-{index}"
        try:
            response = pool.request("POST", url + path, body=json.dumps(body).encode(), headers=headers,
                                    preload_content=False)
            data = b""
            for chunk in response.stream(None):
                if ttft is None:
                    ttft = time.monotonic() - sent
                data += chunk
            response.release_conn()
            served = response.headers.get("X-Herd-Model")  # herd may serve a substitute: not what was asked
            ok = (response.status == 200 and b'"error"' not in data[-300:]
                  and (served is None or full_name(served) == full_name(model)))
        except Exception:  # noqa: BLE001 - a failure is a result here
            ok, response = False, None
        latency = time.monotonic() - sent
        node = response.headers.get("X-Herd-Node") if ok else None
        results[index] = Outcome(latency * SCALE, (ttft if stream and ttft else latency) * SCALE, ok, stream, node)

    threads = []
    for index, (arrival, path, body, stream, model, *_rest) in enumerate(plan):
        delay = arrival / SCALE - (time.monotonic() - start)
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(index, path, body, stream, model), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(None if give_up is None else max(0.0, start + give_up / SCALE - time.monotonic()))
    final = list(results)
    for index, request in enumerate(plan):
        if final[index] is None:
            cut = give_up - request.arrival
            final[index] = Outcome(cut, cut, False, request.stream, None)
    return final


def read_traces(data_dir):
    """herd's trace rows in `data_dir` (written by the time herd has stopped)."""
    path = Path(data_dir) / "latency.db"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM request_traces ORDER BY timestamp")]


def run(router, plan, data_dir, lab, give_up=None, talks=None):
    """One router's run of `plan` on fresh nodes of `lab`; with `talks` (conversations and agent
    loops) the run replays them beside the plan (replay_conversations) and ends at `give_up`."""
    nodes = start_fleet(lab)
    proc, agents, proxy = None, [], None
    unsent, started = 0, time.monotonic()
    try:
        if router.startswith("herd"):
            # requests given up on are still running at the end: herd need not drain them
            proc, agents, url = start_herd_on(nodes, data_dir, lab, agents=router != "herd-agentless",
                                              flags=["--drain-timeout", "5"] if give_up else ())
            if router == "herd-no-affinity":
                change_settings(url, {"prompt_affinity": False})
        else:
            proxy = BaselineProxy({n: (node.url, set(node.models)) for n, node in nodes.items()}, router)
            url = proxy.url
        if talks is None:
            results = replay(url, plan, give_up, numbered=lab.traffic.numbered)
        else:
            started = time.monotonic()
            results, unsent = replay_conversations(url, plan, talks, give_up - CONVERSATION_DRAIN_S, give_up)
        stats = {}
        for node in nodes.values():
            for key, value in node.stats.items():
                stats[key] = stats.get(key, 0) + value
        records = [(name, record) for name, node in nodes.items() for record in list(node.records)]
        emptied = sorted(((at - started) * SCALE, name, model, cause) for name, node in nodes.items()
                         for at, model, cause in list(node.emptied))
    finally:
        for agent in agents:
            agent.stop()
        if proc is not None:
            stop([proc])
        if proxy is not None:
            proxy.stop()
        for node in nodes.values():
            node.stop()
    return RouterRun(results, stats, records, read_traces(data_dir) if proc is not None else [], unsent, emptied)


def change_settings(url, changes):
    """Change herd's runtime settings as the dashboard does (allowed from loopback without a key)."""
    response = urllib3.request("POST", url + "/dashboard/api/settings", body=json.dumps(changes).encode(),
                               headers={"Content-Type": "application/json"}, timeout=10, retries=False)
    if response.status != 200 or any(json.loads(response.data).get(k) != v for k, v in changes.items()):
        raise RuntimeError(f"herd refused the settings {changes}: {response.status} {response.data[:200]!r}")


def by_model(plan, results, bound):
    """Mean latency over the lower bound, per model: where the time goes."""
    ratios = {}
    for (_, _, _, _, model, _, _), result, lb in zip(plan, results, bound):
        ratios.setdefault(model, []).append(result[0] / lb)
    return "  ".join(f"{m.removesuffix(':latest')} {statistics.fmean(r):.2f}" for m, r in sorted(ratios.items()))


def summary(results, stats):
    ttfts = [r[1] for r in results if r[3]]
    return {"failures": sum(1 for r in results if not r[2]), **mean_p95_p99([r[0] for r in results]),
            "ttft_p95": pct(ttfts, 95) if ttfts else math.nan, "loads": stats["loads"],
            "reloads": stats["reloads"], "evictions": stats["evictions"],
            "needless_reloads": stats["needless_reloads"]}


# -- the three seeds of the classic home lab --------------------------------------------------------

def main_classic(args):
    CONTEXT["studio"] = args.studio_context
    lab = classic_lab(args.rate)
    print(f"simulated fleet: {', '.join(f'{n} ({v[0]} GB, {v[1]} GB/s, {v[2]} slots)' for n, v in FLEET.items())}")
    print(f"workload: Poisson {args.rate}/s for {DURATION_S:g} s, time scale {SCALE:g}x; times in simulated seconds; "
          f"studio's default context {args.studio_context}")
    all_ok, unchecked = True, False
    for seed in args.seeds:
        plan = workload(seed, args.rate)
        bound = lower_bound(plan)
        lb = mean_p95_p99(bound)
        print(f"\nseed {seed}: {len(plan)} requests; lower bound mean {lb['mean']:.2f} s, p95 {lb['p95']:.2f} s, "
              f"p99 {lb['p99']:.2f} s")
        print(f"{'router':18} {'fail':>4} {'mean':>7} {'p95':>7} {'p99':>7} {'ttft95':>7} {'loads':>6} "
              f"{'reloads':>7} {'evict':>6} {'needless':>8} {'mean/LB':>8} {'p95/LB':>7}")
        rows = {}
        for router in args.routers:
            outcome = run(router, plan, Path(tempfile.mkdtemp(prefix="herd-routing-")), lab)
            results = outcome.results
            row = rows[router] = summary(results, outcome.stats)
            row["by_model"] = by_model(plan, results, bound)
            if router == "herd" and args.slowest:
                spread = {}
                for (_, _, _, _, model, _, _), result in zip(plan, results):
                    spread.setdefault(model, {}).setdefault(result[4], 0)
                    spread[model][result[4]] += 1
                for model, nodes in sorted(spread.items()):
                    print(f"    {model:24} {nodes}")
                order = sorted(range(len(plan)), key=lambda i: -results[i][0])[:args.slowest]
                for i in order:
                    arrival, path, _, stream, model, prompt, out = plan[i]
                    print(f"    t={arrival:6.1f} {model:24} {path:22} prompt {prompt:5} out {out:4} -> "
                          f"{results[i][4]}: {results[i][0]:6.2f} s (bound {bound[i]:.2f})")
            print(f"{router:18} {row['failures']:4d} {row['mean']:7.2f} {row['p95']:7.2f} {row['p99']:7.2f} "
                  f"{row['ttft_p95']:7.2f} {row['loads']:6d} {row['reloads']:7d} {row['evictions']:6d} "
                  f"{row['needless_reloads']:8d} {row['mean'] / lb['mean']:8.2f} {row['p95'] / lb['p95']:7.2f}",
                  flush=True)
        for router, row in rows.items():
            print(f"  {router} latency / lower bound by model: {row['by_model']}")
        if "herd" in rows:
            h, lc = rows["herd"], rows.get("least-connections")
            checks = {
                "0 failures": h["failures"] == 0,
                "mean <= 1.5x LB": h["mean"] <= 1.5 * lb["mean"],
                "p95 <= 1.5x LB": h["p95"] <= 1.5 * lb["p95"],
                "no needless reloads": h["needless_reloads"] == 0,
            }
            if lc is not None:
                checks.update({
                    "mean <= 0.5x least-conn": h["mean"] <= 0.5 * lc["mean"],
                    "p95 <= 0.35x least-conn": h["p95"] <= 0.35 * lc["p95"],
                    "cold loads <= half of least-conn": h["loads"] <= 0.5 * lc["loads"],
                })
            else:
                unchecked = True
            all_ok &= all(checks.values())
            print("targets: " + ", ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in checks.items()))
    if "herd" not in args.routers:
        print("\nno targets checked: they are herd's")
    elif not all_ok:
        print("\nSOME TARGETS FAIL")
    else:
        print("\nALL TARGETS PASS" if not unchecked else
              "\nEVERY TARGET CHECKED PASSES (those against least-connections need --routers ... least-connections)")
    return 0 if all_ok else 1


# -- generated home labs: the targets of issue 13 -----------------------------------------------------

GIVE_UP_S = 120.0  # a request may still run this long after the last arrival (or 4x the slowest bound)
ROUTERS = ["herd", "least-connections", "round-robin"]
# issue 13's targets for herd over the generated labs
VS_LC_EACH = 0.9  # in every lab, herd's mean and p95 at most this share of least-connections'
VS_LC_MEDIAN = 0.6  # median over labs of herd's mean / least-connections' mean
MEAN_LB_MEDIAN = 1.5  # median over labs of herd's mean / the bound's
P95_LB_MEDIAN = 1.6
LB_WORST = 2.5  # mean and p95 over the bound's, in the worst lab
RUNTIME_S = 20 * 60
SLOWEST_SHARE = 0.05  # the tail whose time is broken down apart: the requests at or above the p95


@dataclass
class LabResult:
    """One generated lab, its workload and bound, and how each router did."""

    seed: int
    lab: object  # bench_common.HomeLab
    plan: list
    bound: object  # bench_common.Bound
    runs: dict  # router -> RouterRun
    rows: dict  # router -> summary(), with ratios to the bound and to least-connections

    def badness(self):
        """herd's worse ratio to the bound (what the table is sorted by)."""
        row = self.rows.get("herd") or next(iter(self.rows.values()))
        return max(row["mean/LB"], row["p95/LB"])


def run_lab(seed, routers):
    lab = generated_lab(seed)
    plan = workload(seed, lab=lab)
    bound = bounds(plan, lab)
    give_up = plan[-1].arrival + max(GIVE_UP_S, 4 * max(bound.alone))
    runs, rows = {}, {}
    for router in routers:
        data_dir = tempfile.mkdtemp(prefix="herd-generated-")
        try:
            runs[router] = run(router, plan, Path(data_dir), lab, give_up)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        row = rows[router] = summary(runs[router].results, runs[router].stats)
        row["mean/LB"], row["p95/LB"] = row["mean"] / bound.mean, row["p95"] / bound.p95
    lc = rows.get("least-connections")
    for row in rows.values():
        row["mean/LC"] = row["mean"] / lc["mean"] if lc else math.nan
        row["p95/LC"] = row["p95"] / lc["p95"] if lc else math.nan
    return LabResult(seed, lab, plan, bound, runs, rows)


def print_lab(result, rank):
    bound = result.bound
    print(f"\n#{rank} lab {result.seed}: {len(result.plan)} requests; bound mean {bound.mean:.2f} s "
          f"(alone {bound.alone_mean:.2f}), p95 {bound.p95:.2f} s (alone {bound.alone_p95:.2f})")
    for line in result.lab.describe():
        print(f"  {line}")
    print(f"  {'router':18} {'fail':>4} {'mean':>7} {'p95':>7} {'loads':>6} {'reloads':>7} {'needless':>8} "
          f"{'mean/LB':>8} {'p95/LB':>7} {'mean/LC':>8} {'p95/LC':>7}")
    for router, row in result.rows.items():
        print(f"  {router:18} {row['failures']:4d} {row['mean']:7.2f} {row['p95']:7.2f} {row['loads']:6d} "
              f"{row['reloads']:7d} {row['needless_reloads']:8d} {row['mean/LB']:8.2f} {row['p95/LB']:7.2f} "
              f"{row['mean/LC']:8.2f} {row['p95/LC']:7.2f}")


def check_targets(results, elapsed):
    """Print herd's results against issue 13's targets; returns whether all pass."""
    herd = [(r.seed, r.rows["herd"]) for r in results if "herd" in r.rows]
    if not herd:
        print("\nno targets checked: they are herd's")
        return True
    checks = []

    def check(name, ok, detail):
        checks.append(ok)
        print(f"  {name:48} {detail:44} {'PASS' if ok else 'FAIL'}")

    def worst(key):
        seed, row = max(herd, key=lambda item: item[1][key])
        return row[key], seed

    print(f"\ntargets (issue 13), herd over {len(herd)} generated labs:")
    failures = sum(row["failures"] for _, row in herd)
    check("0 failures", failures == 0, f"{failures} of {sum(len(r.plan) for r in results)} requests failed")
    if all(not math.isnan(row["mean/LC"]) for _, row in herd):
        for key in ("mean/LC", "p95/LC"):
            value, seed = worst(key)
            within = sum(1 for _, row in herd if row[key] <= VS_LC_EACH)
            check(f"every lab: {key.split('/')[0]} <= {VS_LC_EACH}x least-connections'", within == len(herd),
                  f"{within} of {len(herd)} labs; worst {value:.2f} (lab {seed})")
        median = statistics.median(row["mean/LC"] for _, row in herd)
        check(f"median mean / least-connections' <= {VS_LC_MEDIAN}", median <= VS_LC_MEDIAN, f"{median:.2f}")
    else:
        print("  (the targets against least-connections need --routers ... least-connections)")
    for key, target in (("mean/LB", MEAN_LB_MEDIAN), ("p95/LB", P95_LB_MEDIAN)):
        median = statistics.median(row[key] for _, row in herd)
        check(f"median {key.replace('LB', 'bound')} <= {target}", median <= target, f"{median:.2f}")
    for key in ("mean/LB", "p95/LB"):
        value, seed = worst(key)
        check(f"worst {key.replace('LB', 'bound')} <= {LB_WORST}", value <= LB_WORST, f"{value:.2f} (lab {seed})")
    needless = sum(row["needless_reloads"] for _, row in herd)
    check("needless reloads (num_ctx <= loaded context): 0", needless == 0, f"{needless}")
    check(f"run time under {RUNTIME_S // 60} minutes", elapsed <= RUNTIME_S, f"{elapsed / 60:.1f} min")
    print("  (the three-seed benchmark is another command: python tests/bench_routing.py)")
    beaten = [(r.seed, router, key) for r in results for router, row in r.rows.items()
              for key in ("mean/LB", "p95/LB") if row[key] < 1]
    if beaten:
        print("  WARNING: a router beat the lower bound, so the simulator or the bound is wrong: "
              + ", ".join(f"lab {seed} {router} {key}" for seed, router, key in beaten))
    return all(checks)


# -- where the time went -------------------------------------------------------------------------

TIME_PARTS = {"bound": "the bound: alone on the fastest node, hot",
              "slower_node": "a slower node than the fastest",
              "node_wait": "waiting at the node (slot, busy models, drain)",
              "herd_queue": "waiting in herd's queue",
              "load": "cold load", "reload": "reload at another context",
              "sharing": "sharing slowdown (batching, other models)",
              "other": "the rest (proxy, retries, client)"}


def time_spent(result, router):
    """Per request served: its latency split into TIME_PARTS (sim seconds), from what the nodes
    recorded, and for herd its trace rows' queue_ms. {index: {part: seconds}}."""
    run_ = result.runs[router]
    last = {}
    for _, record in sorted(run_.records, key=lambda item: item[1].ended):
        if record.tag is not None:
            last[record.tag] = record
    queued = {}
    for row in run_.traces:
        index = request_index(row)
        if index is not None:
            queued[index] = (row.get("queue_ms") or 0.0) / 1000 * SCALE
    parts = {}
    for index, (outcome, record) in enumerate((o, last.get(i)) for i, o in enumerate(run_.results)):
        if not outcome.ok or record is None:
            continue
        bound = result.bound.alone[index]
        split = {"bound": bound, "slower_node": record.alone * SCALE - bound, "node_wait": record.slot_wait * SCALE,
                 "herd_queue": queued.get(index, 0.0), "load": record.load * SCALE, "reload": record.reload * SCALE,
                 "sharing": (record.service - record.alone) * SCALE}
        split["other"] = outcome.latency - sum(split.values())
        parts[index] = split
    return parts


def request_index(row):
    """The benchmark's number of the request a trace row is for (from its X-Herd-Tags)."""
    for tag in json.loads(row.get("tags") or "[]"):
        if tag.startswith("bench-"):
            return int(tag.removeprefix("bench-"))
    return None


def print_time_spent(result):
    routers = [r for r in ("herd", "least-connections") if r in result.runs]
    columns = {}
    for router in routers:
        parts = time_spent(result, router)
        latencies = {i: result.runs[router].results[i].latency for i in parts}
        tail = sorted(latencies, key=latencies.get)[-max(1, round(SLOWEST_SHARE * len(latencies))):]
        columns[router] = [{p: statistics.fmean(parts[i][p] for i in group) for p in TIME_PARTS}
                           if group else dict.fromkeys(TIME_PARTS, math.nan) for group in (list(parts), tail)]
    print(f"\nwhere the time went in lab {result.seed} (mean per request served, sim seconds; tail = the "
          f"slowest {SLOWEST_SHARE:.0%}):")
    print(f"  {'':48}" + "".join(f" {router[:12] + ' all':>17} {'tail':>7}" for router in routers))
    for part, label in TIME_PARTS.items():
        print(f"  {label:48}" + "".join(f" {columns[r][0][part]:17.2f} {columns[r][1][part]:7.2f}" for r in routers))
    print(f"  {'= latency':48}" + "".join(f" {sum(columns[r][0].values()):17.2f} {sum(columns[r][1].values()):7.2f}"
                                          for r in routers))


# -- what herd expected: its decisions against what happened -------------------------------------

def last_decision(row):
    """The chosen candidate and all candidates of a trace row's last routing decision (herd's
    decision_view), with herd's expected seconds in sim seconds; or (None, [])."""
    attempts = json.loads(row.get("decisions") or "[]")
    if not attempts:
        return None, []
    view = herd.decision_view(attempts[-1])
    candidates = [{"node": c["node_id"], "eta": c["eta_s"] * SCALE, "deferred": c["deferred"],
                   **{cause: seconds * SCALE for cause, seconds in c["seconds"].items()}}  # herd works in real seconds
                  for c in view["candidates"]]
    return next((c for c in candidates if c["node"] == view["chosen"]), None), candidates


def print_diagnosis(result):
    """What herd expected of its choices in `result`'s lab, against what happened."""
    if "herd" not in result.runs:
        return
    lab, plan, run_ = result.lab, result.plan, result.runs["herd"]
    parts = time_spent(result, "herd")
    rows = {request_index(row): row for row in run_.traces}
    print(f"\nlab {result.seed}: herd's choices against what happened (sim seconds)")
    print(f"  {'model':22} {'n':>4} {'bound':>6} {'herd':>6} {'lc':>6}  herd sent them to (node: requests; "
          f"* = fastest for the model)")
    lc = result.runs.get("least-connections")
    for model in sorted({r.model for r in plan}):
        indices = [i for i, r in enumerate(plan) if r.model == model]
        speeds = {name: fastest_tps(lab, m, model) for name, m in lab.machines.items() if model in m.installed}
        fastest = max(speeds, key=speeds.get)
        sent = {}
        for i in indices:
            sent[run_.results[i].node] = sent.get(run_.results[i].node, 0) + 1
        herd_mean = statistics.fmean(run_.results[i].latency for i in indices)
        lc_mean = statistics.fmean(lc.results[i].latency for i in indices) if lc else math.nan
        print(f"  {model.removesuffix(':latest'):22} {len(indices):4d} "
              f"{statistics.fmean(result.bound.alone[i] for i in indices):6.2f} {herd_mean:6.2f} {lc_mean:6.2f}  "
              + ", ".join(f"{node}{'*' if node == fastest else ''}: {count}"
                          for node, count in sorted(sent.items(), key=lambda item: -item[1])))
    expected = {"wait": 0.0, "load": 0.0, "service": 0.0}
    actual = {"wait": 0.0, "load": 0.0, "service": 0.0}
    ratios = []
    for index, split in parts.items():
        chosen, _ = last_decision(rows.get(index) or {})
        if chosen is None:
            continue
        expected["wait"] += chosen["wait"]
        expected["load"] += chosen["load"] + chosen["reload"]
        expected["service"] += chosen["service"]
        actual["wait"] += split["node_wait"]
        actual["load"] += split["load"] + split["reload"]
        actual["service"] += split["bound"] + split["slower_node"] + split["sharing"]
        ratios.append((run_.results[index].latency - split["herd_queue"]) / max(chosen["eta"], 1e-3))
    if ratios:
        print(f"  from the decision that sent each request (after any wait in herd's queue), summed over "
              f"{len(ratios)} requests: " + ", ".join(f"{k} {expected[k]:.1f} expected / {actual[k]:.1f} actual"
                                                       for k in expected)
              + f"; took / expected: median {statistics.median(ratios):.2f}, p90 {pct(ratios, 90):.2f}")
    loads = [(i, s) for i, s in parts.items() if s["load"] > 0 or s["reload"] > 0]
    print(f"  requests that waited for a load or reload they started: {len(loads)}, "
          f"{sum(s['load'] + s['reload'] for _, s in loads):.1f} s in all; needless reloads: "
          f"{run_.stats['needless_reloads']}; cold loads on the nodes (preloads included): {run_.stats['loads']}")
    slowest = sorted(parts, key=lambda i: -(run_.results[i].latency - result.bound.alone[i]))[:5]
    print("  the 5 requests herd made latest (latency - bound):")
    for index in slowest:
        request, split = plan[index], parts[index]
        chosen, candidates = last_decision(rows.get(index) or {})
        spent = ", ".join(f"{k} {v:.1f}" for k, v in split.items() if k not in ("bound", "other") and v > 0.05)
        print(f"    t={request.arrival:5.1f} {request.model.removesuffix(':latest'):18} "
              f"{'num_ctx ' + str(request.body['options']['num_ctx']) + ' ' if 'num_ctx' in request.body.get('options', {}) else ''}"
              f"-> {run_.results[index].node}: {run_.results[index].latency:.1f} s, bound {split['bound']:.1f} "
              f"({spent})")
        for candidate in sorted(candidates, key=lambda c: c["eta"])[:4]:
            truth = (request.prompt / lab.physics.prefill_factor + request.out) / fastest_tps(
                lab, lab.machines[candidate["node"]], request.model, request.path.startswith("/v1/"))
            print(f"        {'chose' if candidate is chosen else '     '} {candidate['node']:8} expected "
                  f"{candidate['eta']:6.1f} (wait {candidate['wait']:.1f} load {candidate['load'] + candidate['reload']:.1f} "
                  f"service {candidate['service']:.1f}{' deferred' if candidate['deferred'] else ''}); "
                  f"alone there {truth:.1f}")


def save(results, path):
    """Write each lab's shape, bound, rows and, per router, every request's outcome, what its node
    recorded and (herd) its trace row, for a closer look without running again."""
    kept = ("node_id", "model", "status", "latency_ms", "queue_ms", "load_ms", "cold_load", "reload",
            "retry_count", "error_message", "decisions")
    labs = []
    for r in results:
        runs = {}
        for router, run_ in r.runs.items():
            runs[router] = {"results": [o._asdict() for o in run_.results], "stats": run_.stats,
                            "records": [dict(asdict(record), node=node) for node, record in run_.records],
                            "traces": {request_index(row): {k: row.get(k) for k in kept} for row in run_.traces}}
        labs.append({"seed": r.seed, "shape": r.lab.describe(), "plan": [(q.arrival, q.model, q.prompt, q.out,
                                                                          q.path, q.stream) for q in r.plan],
                     "bound": {"mean": r.bound.mean, "p95": r.bound.p95, "alone_mean": r.bound.alone_mean,
                               "alone_p95": r.bound.alone_p95, "alone": r.bound.alone},
                     "rows": r.rows, "runs": runs})
    Path(path).write_text(json.dumps(labs))


def main_generated(args):
    seeds = args.only or list(range(1, args.generated + 1))
    started = time.monotonic()
    print(f"{len(seeds)} generated home labs (seeds {', '.join(map(str, seeds))}), routers {', '.join(args.routers)}; "
          f"time scale {SCALE:g}x, times in simulated seconds", flush=True)
    results = []
    for seed in seeds:
        result = run_lab(seed, args.routers)
        results.append(result)
        print(f"lab {seed}: {len(result.plan)} requests, " + "; ".join(
            f"{router} mean/LB {row['mean/LB']:.2f} p95/LB {row['p95/LB']:.2f} fail {row['failures']}"
            for router, row in result.rows.items()) + f"  [{(time.monotonic() - started) / 60:.1f} min]", flush=True)
    elapsed = time.monotonic() - started
    ranked = sorted(results, key=lambda r: -r.badness())
    print("\nlabs, worst first (by herd's larger ratio to the bound):")
    for rank, result in enumerate(ranked, 1):
        print_lab(result, rank)
    ok = check_targets(results, elapsed)
    print_time_spent(ranked[0])
    for result in ranked[:3]:
        print_diagnosis(result)
    if args.save:
        save(results, args.save)
    print(f"\ntook {elapsed / 60:.1f} min; {'ALL TARGETS PASS' if ok else 'SOME TARGETS FAIL'}")
    return 0 if ok else 1


# -- conversations: prompt caches (issue 14) ---------------------------------------------------------
#
# --conversations replays, beside a lab's single requests, conversations and agent loops that
# resend their history (bench_common.conversations) on nodes that keep Ollama's per-slot prompt
# caches, through herd, herd with its prompt_affinity setting off, and least-connections (and
# round-robin when asked). What is measured, per router:
# - follow-ups: every request of a conversation or agent loop after its first; their mean time to
#   first token (they all stream);
# - prompt tokens evaluated: the sum over every chat and generation request of the
#   prompt_eval_count its node reported, against the minimum (minimum_tokens);
# - single requests (the lab's own mix, embeddings included): mean and p95 latency;
# - per node, the requests it received against its share (node_shares).

CONVERSATION_ROUTERS = ["herd", "herd-no-affinity", "least-connections"]
CONVERSATION_TAIL_S = 200.0  # no conversation's request starts later than this after the window...
CONVERSATION_DRAIN_S = 120.0  # ...and one still running this long after that fails
# issue 14's targets for herd
FOLLOW_UP_VS_LC = 0.2  # follow-ups' mean time to first token, at most this share of least-connections'...
FOLLOW_UP_VS_OFF = 0.6  # ...and of herd's own without affinity
EVALUATED_VS_MINIMUM = 1.3  # prompt tokens evaluated over the run, at most this many times the minimum
SINGLE_VS_OFF = 1.05  # single requests' mean and p95 at most 5% above herd's without affinity
SHARE_SIGMAS = 2  # a node's count may exceed its share by this many standard deviations of run-to-run noise


class Sent(NamedTuple):
    """How one request of a conversations run went, as its client saw it (sim seconds, tokens)."""

    kind: str  # single | chat | agent
    talk: int | None  # the conversation or agent loop, by index
    turn: int  # 0: the first request of a conversation (and every single request)
    shared: bool  # of a conversation that opens with a shared system prompt
    model: str
    sent: float  # from the start of the run
    latency: float
    ttft: float  # to the first token; to the end for a reply that is not streamed
    ok: bool
    node: str | None
    prompt_tokens: int
    evaluated: int | None  # prompt_eval_count (or usage.prompt_tokens) as the node reported it
    minimum: int  # see minimum_tokens
    embedding: bool


def minimum_tokens(text, previous):
    """Prompt tokens a router with perfect affinity has evaluated for the prompt `text`: every
    request goes to the node whose slot holds what the same conversation's previous request left
    there (`previous`: that request's prompt and its reply; None for a first request or a single
    one), and that slot still holds it. So: the prompt's tokens not in the prefix it shares with
    `previous`, at least one (Ollama's runner evaluates the last token again). A router can
    evaluate less only where a first turn finds a shared system prompt already in a slot."""
    return prompt_tokens(text) - (cached_tokens(previous, text) if previous is not None else 0)


def read_body(data):
    """(reply text, prompt tokens evaluated, error) from a reply in any of Ollama's and OpenAI's
    shapes, streamed (NDJSON, SSE) or not."""
    text, evaluated, error = [], None, None
    for line in data.splitlines():
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[5:].strip()
        if not line or line == b"[DONE]":
            continue
        try:
            part = json.loads(line)
        except ValueError:
            error = f"not JSON: {line[:80]!r}"
            continue
        if part.get("error"):
            error = part["error"]
        text.append((part.get("message") or {}).get("content") or part.get("response") or "")
        for choice in part.get("choices") or ():
            said = choice.get("delta") or choice.get("message") or {}
            text.append(said.get("content") or choice.get("text") or "")
        if "prompt_eval_count" in part:
            evaluated = part["prompt_eval_count"]
        elif part.get("usage"):
            evaluated = part["usage"].get("prompt_tokens")
    return "".join(text), evaluated, error


def talk_body(talk, messages, out):
    if talk.openai:
        return "/v1/chat/completions", {"model": talk.model, "messages": messages, "max_tokens": out, "stream": True}
    return "/api/chat", {"model": talk.model, "messages": messages, "options": {"num_predict": out}, "stream": True}


def replay_conversations(url, plan, talks, last_start, give_up):
    """Send the single requests of `plan` at their arrival times and, beside them, each
    conversation's requests in turn: the first at its start, each next one its think time after
    the previous reply, with the history that reply extends (exactly the text the node generated).
    After `last_start` sim seconds no request of a conversation starts; at `give_up` one still
    running fails there. Returns (a Sent per request sent, the number of conversation requests
    never sent)."""
    pool = urllib3.PoolManager(maxsize=256, retries=False, timeout=urllib3.Timeout(connect=10, read=900))
    start = time.monotonic()
    lock = threading.Lock()
    done, running, unsent = [], {}, [0]
    closed = [False]

    def send(key, meta, path, body):
        """Send one request; note how it went unless the run has ended. Returns (ok, reply text)."""
        sent = time.monotonic()
        with lock:
            running[key] = (meta, sent)
        ttft, data, ok, node, reply, evaluated = None, b"", False, None, "", None
        try:
            response = pool.request("POST", url + path, body=json.dumps(body).encode(), preload_content=False,
                                    headers={"Content-Type": "application/json", "X-Herd-Tags": key})
            for chunk in response.stream(None):
                if ttft is None and chunk:
                    ttft = time.monotonic() - sent
                data += chunk
            response.release_conn()
            reply, evaluated, error = read_body(data)
            served = response.headers.get("X-Herd-Model")  # herd may serve a substitute: not what was asked
            ok = (response.status == 200 and error is None
                  and (served is None or full_name(served) == full_name(body["model"])))
            node = response.headers.get("X-Herd-Node") or response.headers.get("X-Bench-Node")
        except Exception:  # noqa: BLE001 - a failure is a result here
            ok = False
        latency = time.monotonic() - sent
        with lock:
            running.pop(key, None)
            if closed[0]:
                return False, ""
            done.append(meta._replace(sent=(sent - start) * SCALE, latency=latency * SCALE,
                                      ttft=(ttft if body.get("stream") and ttft else latency) * SCALE,
                                      ok=ok, node=node if ok else None, evaluated=evaluated))
        return ok, reply

    def single(index, request):
        text = prompt_text(request.body)
        embedding = "embed" in request.path
        meta = Sent("single", None, 0, False, request.model, 0.0, 0.0, 0.0, False, None, prompt_tokens(text), None,
                    prompt_tokens(text), embedding)
        send(f"bench-{index}", meta, request.path, request.body)

    def converse(talk):
        time.sleep(max(0.0, start + talk.start / SCALE - time.monotonic()))
        history = [{"role": "system", "content": talk.system}]
        previous = None
        for turn, ((role, said), out) in enumerate(zip(talk.said, talk.outs)):
            if turn:
                time.sleep(talk.gaps[turn - 1] / SCALE)
            if (time.monotonic() - start) * SCALE >= last_start:
                break
            messages = history + [{"role": role, "content": said}]
            path, body = talk_body(talk, messages, out)
            text = prompt_text(body)
            meta = Sent(talk.kind, talk.index, turn, talk.shared is not None, talk.model, 0.0, 0.0, 0.0, False, None,
                        prompt_tokens(text), None, minimum_tokens(text, previous), False)
            ok, reply = send(f"talk-{talk.index}-{turn}", meta, path, body)
            if not ok:
                turn += 1
                break
            history = messages + [{"role": "assistant", "content": reply}]
            previous = text + reply
        else:
            return
        with lock:
            unsent[0] += len(talk.said) - turn

    threads = [threading.Thread(target=converse, args=(talk,), daemon=True) for talk in talks]
    for thread in threads:
        thread.start()
    for index, request in enumerate(plan):
        delay = request.arrival / SCALE - (time.monotonic() - start)
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=single, args=(index, request), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(max(0.0, start + give_up / SCALE - time.monotonic()))
    with lock:
        closed[0] = True
        for meta, sent in running.values():  # still running at the end: failed there
            cut = give_up - (sent - start) * SCALE
            done.append(meta._replace(sent=(sent - start) * SCALE, latency=cut, ttft=cut))
        return list(done), unsent[0]


@dataclass
class TalkResult:
    """One lab of the conversations benchmark: its workload and how each router did."""

    name: str
    lab: object  # bench_common.HomeLab
    plan: list  # single requests
    talks: list  # bench_common.Conversation
    runs: dict  # router -> RouterRun (results: Sent)
    rows: dict = field(default_factory=dict)  # router -> talk_summary()
    checks: dict = field(default_factory=dict)  # target -> (ok, detail)


def follow_ups(sent, kind=None):
    return [s for s in sent if s.kind != "single" and s.turn and (kind is None or s.kind == kind)]


def mean_of(values):
    return statistics.fmean(values) if values else math.nan


def talk_summary(outcome):
    """A router's figures for a conversations run (sim seconds, tokens)."""
    sent = outcome.results
    singles = [s.latency for s in sent if s.kind == "single"]
    counted = [s for s in sent if s.ok and not s.embedding and s.evaluated is not None]
    talked = [s for s in counted if s.kind != "single"]
    return {"failures": sum(1 for s in sent if not s.ok), "unsent": outcome.unsent,
            "single_mean": mean_of(singles), "single_p95": pct(singles, 95) if singles else math.nan,
            "follow_ttft": mean_of([s.ttft for s in follow_ups(sent)]),
            "follow_latency": mean_of([s.latency for s in follow_ups(sent)]),
            "chat_ttft": mean_of([s.ttft for s in follow_ups(sent, "chat")]),
            "agent_ttft": mean_of([s.ttft for s in follow_ups(sent, "agent")]),
            "first_ttft": mean_of([s.ttft for s in sent if s.kind != "single" and not s.turn]),
            "follow_ups": len(follow_ups(sent)),
            "evaluated": sum(s.evaluated for s in counted), "minimum": sum(s.minimum for s in counted),
            "talk_evaluated": sum(s.evaluated for s in talked), "talk_minimum": sum(s.minimum for s in talked),
            "loads": outcome.stats["loads"], "reloads": outcome.stats["reloads"],
            "evictions": outcome.stats["evictions"]}


def held_follow_ups(sent):
    """{node: follow-ups sent to the node that served the same conversation's previous request}."""
    where = {(s.talk, s.turn): s.node for s in sent if s.kind != "single" and s.ok}
    held = {}
    for s in follow_ups(sent):
        if s.ok and where.get((s.talk, s.turn - 1)) == s.node:
            held[s.node] = held.get(s.node, 0) + 1
    return held


def node_counts(sent, keep=lambda s: True):
    counts = {}
    for s in sent:
        if s.ok and keep(s):
            counts[s.node] = counts.get(s.node, 0) + 1
    return counts


def node_shares(result):
    """Per node: requests herd sent there, its share, the follow-ups it held the prefix of, and the
    allowed noise. A node's share is what herd with prompt_affinity off sent it in the same lab
    and workload (routing by speed, load and memory alone), scaled to the requests herd served:
    affinity should add only the follow-ups whose conversation the node holds. Two runs of one
    router differ by thread timing, so the share is allowed SHARE_SIGMAS binomial standard
    deviations: sqrt(share x (1 - share / total)). {node: (received, share, held, margin)}."""
    herd_sent, off_sent = result.runs["herd"].results, result.runs["herd-no-affinity"].results
    received, off = node_counts(herd_sent), node_counts(off_sent)
    total, off_total = sum(received.values()), sum(off.values()) or 1
    held = held_follow_ups(herd_sent)
    shares = {}
    for node in sorted(set(received) | set(off)):
        share = off.get(node, 0) * total / off_total
        margin = SHARE_SIGMAS * math.sqrt(share * max(0.0, 1 - share / total)) if total else 0.0
        shares[node] = (received.get(node, 0), share, held.get(node, 0), margin)
    return shares


def run_talk_lab(name, lab, seed, routers):
    """Replay lab `lab` (already made a conversation_lab) with its seeded conversations through `routers`."""
    plan = workload(seed, lab=lab)
    talks = conversations(seed, lab)
    runs = {}
    for router in routers:
        data_dir = tempfile.mkdtemp(prefix="herd-conversations-")
        try:
            give_up = lab.traffic.duration_s + CONVERSATION_TAIL_S + CONVERSATION_DRAIN_S
            runs[router] = run(router, plan, Path(data_dir), lab, give_up, talks)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    result = TalkResult(name, lab, plan, talks, runs)
    result.rows = {router: talk_summary(outcome) for router, outcome in runs.items()}
    result.checks = talk_checks(result)
    return result


def talk_checks(result):
    """issue 14's targets for herd in one lab: {target: (ok, detail)} (those whose routers ran)."""
    rows, checks = result.rows, {}
    herd = rows.get("herd")
    if herd is None:
        return checks
    lc, off = rows.get("least-connections"), rows.get("herd-no-affinity")
    checks["0 failures"] = (herd["failures"] == 0, f"{herd['failures']} failed, {herd['unsent']} turns not sent")
    if lc:
        ratio = herd["follow_ttft"] / lc["follow_ttft"]
        checks[f"follow-up TTFT <= {FOLLOW_UP_VS_LC}x least-connections'"] = (
            ratio <= FOLLOW_UP_VS_LC, f"{herd['follow_ttft']:.2f} / {lc['follow_ttft']:.2f} s = {ratio:.2f}")
    if off:
        ratio = herd["follow_ttft"] / off["follow_ttft"]
        checks[f"follow-up TTFT <= {FOLLOW_UP_VS_OFF}x herd without affinity"] = (
            ratio <= FOLLOW_UP_VS_OFF, f"{herd['follow_ttft']:.2f} / {off['follow_ttft']:.2f} s = {ratio:.2f}")
    ratio = herd["evaluated"] / herd["minimum"]
    checks[f"prompt tokens evaluated <= {EVALUATED_VS_MINIMUM}x minimum"] = (
        ratio <= EVALUATED_VS_MINIMUM, f"{herd['evaluated']:,} / {herd['minimum']:,} = {ratio:.2f}")
    if off:
        for key in ("single_mean", "single_p95"):
            ratio = herd[key] / off[key]
            checks[f"single {key[7:]} <= {SINGLE_VS_OFF}x herd without affinity"] = (
                ratio <= SINGLE_VS_OFF, f"{herd[key]:.2f} / {off[key]:.2f} s = {ratio:.2f}")
        over = [(node, received - share - held, margin)
                for node, (received, share, held, margin) in node_shares(result).items()]
        worst = max(over, key=lambda item: item[1] - item[2])
        checks["no node over its share + held prefixes"] = (
            all(excess <= margin for _, excess, margin in over),
            f"worst {worst[0]}: {worst[1]:+.0f} (noise allowed {worst[2]:.0f})")
    return checks


def print_talk_lab(result):
    lab, talks = result.lab, result.talks
    chats = [t for t in talks if t.kind == "chat"]
    print(f"\n{'-' * 100}")
    agents = [t for t in talks if t.kind == "agent"]
    print(f"\n{result.name}: {len(result.plan)} single requests, {len(chats)} conversations "
          f"({sum(len(t.said) for t in chats)} turns, {sum(1 for t in chats if t.shared is not None)} with a shared "
          f"system prompt), {len(agents)} agent loops ({sum(len(t.said) for t in agents)} steps)")
    for line in lab.describe():
        print(f"  {line}")
    print(f"  {'router':18} {'fail':>4} {'unsent':>6} {'single':>7} {'p95':>7} {'follow-up TTFT':>14} {'chat':>6} "
          f"{'agent':>6} {'first':>6} {'f-u end':>7} {'prompt tokens evaluated':>24} {'/min':>5} {'talks':>5} "
          f"{'loads':>5} {'reload':>6} {'evict':>5}")
    for router, row in result.rows.items():
        print(f"  {router:18} {row['failures']:4d} {row['unsent']:6d} {row['single_mean']:7.2f} {row['single_p95']:7.2f} "
              f"{row['follow_ttft']:14.2f} {row['chat_ttft']:6.2f} {row['agent_ttft']:6.2f} {row['first_ttft']:6.2f} "
              f"{row['follow_latency']:7.2f} "
              f"{row['evaluated']:>11,} of {row['minimum']:>9,} {row['evaluated'] / row['minimum']:5.2f} "
              f"{row['talk_evaluated'] / max(1, row['talk_minimum']):5.2f} {row['loads']:5d} {row['reloads']:6d} "
              f"{row['evictions']:5d}", flush=True)
    if "herd" in result.runs and "herd-no-affinity" in result.runs:
        others = [r for r in result.runs if r not in ("herd", "herd-no-affinity")]
        counts = {r: node_counts(result.runs[r].results) for r in others}
        first = {r: node_counts(result.runs[r].results, lambda s: s.shared and not s.turn)
                 for r in ("herd", "herd-no-affinity")}
        print("  per node (requests served; share: what herd without affinity sent there, scaled to herd's total; "
              "held: follow-ups herd sent where their previous request ran)")
        print(f"    {'node':8} {'herd':>5} {'share':>6} {'held':>5} {'excess':>7} {'noise':>6}  "
              + "".join(f"{r[:17]:>18}" for r in others) + "   first turns with a shared prompt: herd / off")
        for node, (received, share, held, margin) in node_shares(result).items():
            print(f"    {node!s:8} {received:5d} {share:6.1f} {held:5d} {received - share - held:+7.1f} {margin:6.1f}  "
                  + "".join(f"{counts[r].get(node, 0):18d}" for r in others)
                  + f"   {first['herd'].get(node, 0):3d} / {first['herd-no-affinity'].get(node, 0)}")
    if result.checks:
        print("  targets (issue 14):")
        for name, (ok, detail) in result.checks.items():
            print(f"    {name:52} {detail:40} {'PASS' if ok else 'FAIL'}")


# -- what herd expected of the prompt caches: its decisions against what the nodes evaluated ------

def talk_decisions(result):
    """Per follow-up herd served: where the previous request ran, where this one went, the tokens
    the node found cached against what herd expected there, and every candidate's view (herd's
    decision_view, in sim seconds). [dict]"""
    outcome = result.runs["herd"]
    rows = {}
    for row in outcome.traces:
        for tag in json.loads(row.get("tags") or "[]"):
            if tag.startswith("talk-"):
                rows[tag] = row
    where = {(s.talk, s.turn): s for s in outcome.results if s.kind != "single"}
    found = []
    for s in follow_ups(outcome.results):
        previous = where.get((s.talk, s.turn - 1))
        row = rows.get(f"talk-{s.talk}-{s.turn}")
        if not s.ok or previous is None or row is None:
            continue
        attempts = json.loads(row.get("decisions") or "[]")
        if not attempts:
            continue
        view = herd.decision_view(attempts[-1])
        candidates = {c["node_id"]: {"eta": c["eta_s"] * SCALE, "cached": c["cached_tokens"],
                                     "prompt": (c["prompt_s"] or 0.0) * SCALE, "deferred": c["deferred"],
                                     **{k: v * SCALE for k, v in c["seconds"].items()}}
                      for c in view["candidates"]}
        emptied = [cause for at, node, model, cause in outcome.emptied
                   if node == s.node and full_name(model) == full_name(s.model) and previous.sent < at < s.sent]
        found.append({"sent": s, "previous": previous.node, "chosen": view["chosen"], "candidates": candidates,
                      "excluded": {e["node_id"]: e["reason"] for e in view["excluded"]},
                      "cached": s.prompt_tokens - s.evaluated, "expected": (candidates.get(s.node) or {}).get("cached"),
                      "lost": s.evaluated - s.minimum, "emptied": emptied})
    return found


def print_talk_decisions(result):
    """Where herd's follow-ups lost their prefix, and why, from its decisions."""
    if "herd" not in result.runs:
        return
    found = talk_decisions(result)
    if not found:
        return
    stayed = [f for f in found if f["chosen"] == f["previous"]]
    moved = [f for f in found if f["chosen"] != f["previous"]]
    missed = [f for f in stayed if f["expected"] is not None and f["cached"] < 0.9 * f["expected"]]
    print(f"  herd's follow-ups ({len(found)} with a decision): {len(stayed)} went where their previous request ran, "
          f"{len(moved)} elsewhere; tokens evaluated beyond the minimum: "
          f"{sum(f['lost'] for f in stayed):,} on the node that ran the previous request, "
          f"{sum(f['lost'] for f in moved):,} elsewhere")
    expected = sum(f["expected"] or 0 for f in stayed)
    emptied = [f for f in missed if f["emptied"]]
    print(f"    where they stayed, herd expected {expected:,.0f} tokens cached and the nodes found "
          f"{sum(f['cached'] for f in stayed):,}; {len(missed)} found less than 90% of what herd expected "
          f"({sum(f['expected'] - f['cached'] for f in missed):,.0f} tokens): {len(emptied)} because the model was "
          f"loaded, reloaded or evicted there since their previous request, {len(missed) - len(emptied)} because "
          "another request had taken their slot (Ollama gives a request the free slot sharing the longest prefix, "
          "the lowest-numbered among equals)")
    for f in sorted(missed, key=lambda f: -(f["expected"] - f["cached"]))[:3]:
        s = f["sent"]
        print(f"      t={s.sent:5.1f} {s.kind} {s.talk} turn {s.turn} ({s.model.removesuffix(':latest')}) on {s.node}: "
              f"expected {f['expected']:,.0f} cached, found {f['cached']:,} of {s.prompt_tokens:,}; TTFT {s.ttft:.2f} s"
              + (f" ({', '.join(f['emptied'])} since its previous request)" if f["emptied"] else ""))
    if moved:
        print("    moved away from the node holding their conversation (the costliest, with herd's view of "
              "each node; seconds in sim time):")
    for f in sorted(moved, key=lambda f: -f["lost"])[:5]:
        s = f["sent"]
        print(f"      t={s.sent:5.1f} {s.kind} {s.talk} turn {s.turn} ({s.model.removesuffix(':latest')}, "
              f"{s.prompt_tokens:,} tokens) {f['previous']} -> {s.node}: evaluated {s.evaluated:,} "
              f"(minimum {s.minimum:,}), TTFT {s.ttft:.2f} s")
        for node in (f["previous"], s.node):
            c = f["candidates"].get(node)
            if c is None:
                print(f"          {node:8} not a candidate: {f['excluded'].get(node, 'not considered')}")
                continue
            print(f"          {node:8} expected {c['eta']:6.2f} s: wait {c['wait']:.2f}, load {c['load'] + c['reload']:.2f}, "
                  f"service {c['service']:.2f} (prompt {c['prompt']:.2f} for {s.prompt_tokens - c['cached']:,.0f} "
                  f"tokens, {c['cached']:,.0f} cached){' deferred' if c['deferred'] else ''}")


def print_talk_summary(results, elapsed):
    """issue 14's targets over every lab run, and the pooled figures."""
    herd_labs = [r for r in results if r.checks]
    if not herd_labs:
        print("\nno targets checked: they are herd's")
        return True
    print(f"\nsummary over {len(results)} lab{'s' if len(results) > 1 else ''} (issue 14's targets; pooled: the "
          "sums over every lab):")
    names = list(dict.fromkeys(name for r in herd_labs for name in r.checks))
    print(f"  {'target':52} {'labs passing':>12}  failing")
    for name in names:
        marks = [(r.name, r.checks[name][0]) for r in herd_labs if name in r.checks]
        passing = sum(ok for _, ok in marks)
        print(f"  {name:52} {passing:>5} of {len(marks):<5}  {', '.join(n for n, ok in marks if not ok) or '-'}")

    def pooled(router, key):
        return sum(r.rows[router][key] for r in results if router in r.rows)

    def pooled_mean(router, values):
        picked = [v for r in results if router in r.runs for v in values(r.runs[router].results)]
        return mean_of(picked)

    follow = {router: pooled_mean(router, lambda sent: [s.ttft for s in follow_ups(sent)])
              for router in dict.fromkeys(router for r in results for router in r.rows)}
    print("  pooled follow-up TTFT: " + ", ".join(f"{router} {value:.2f} s" for router, value in follow.items()))
    if "herd" in follow:
        print("  pooled prompt tokens evaluated / minimum: " + ", ".join(
            f"{router} {pooled(router, 'evaluated') / pooled(router, 'minimum'):.2f}" for router in follow))
    all_ok = all(ok for r in herd_labs for ok, _ in r.checks.values())
    print(f"\ntook {elapsed / 60:.1f} min; {'ALL TARGETS PASS' if all_ok else 'SOME TARGETS FAIL'}")
    return all_ok


def main_conversations(args):
    """--conversations: the three seeds of the classic lab, or with --generated the generated labs."""
    started = time.monotonic()
    if args.generated or args.only:
        labs = [(f"lab {seed}", conversation_lab(generated_lab(seed), seed, args.multiuser_cache), seed)
                for seed in args.only or range(1, args.generated + 1)]
    else:
        CONTEXT["studio"] = args.studio_context
        labs = [(f"seed {seed}", conversation_lab(classic_lab(args.rate), seed, args.multiuser_cache), seed)
                for seed in args.seeds]
    print(f"conversations and agent loops beside single requests, {len(labs)} lab{'s' if len(labs) > 1 else ''}, "
          f"routers {', '.join(args.routers)}; time scale {SCALE:g}x, times in simulated seconds; herd.py "
          f"{herd_version()}", flush=True)
    results = []
    for name, lab, seed in labs:
        result = run_talk_lab(name, lab, seed, args.routers)
        results.append(result)
        print_talk_lab(result)
        print_talk_decisions(result)
        print(f"  [{(time.monotonic() - started) / 60:.1f} min]", flush=True)
    elapsed = time.monotonic() - started
    ok = print_talk_summary(results, elapsed)
    if args.save:
        save_talks(results, args.save)
    return 0 if ok else 1


def herd_version():
    """The commit herd.py is at, and whether it has changes of its own (it is edited while we measure)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "herd.py"], cwd=root,
                                 check=False).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "(no git)"
    digest = hashlib.sha1((root / "herd.py").read_bytes()).hexdigest()[:10]
    return f"at {commit}" + (f" with uncommitted changes (sha1 {digest})" if changed else "")


def save_talks(results, path):
    """Write each lab's shape and, per router, every request's outcome (and herd's decisions for
    its follow-ups), for a closer look without running again."""
    labs = []
    for r in results:
        runs = {router: {"results": [s._asdict() for s in outcome.results], "stats": outcome.stats,
                         "unsent": outcome.unsent} for router, outcome in r.runs.items()}
        if "herd" in r.runs:
            runs["herd"]["follow_up_decisions"] = [dict(f, sent=f["sent"]._asdict()) for f in talk_decisions(r)]
        labs.append({"name": r.name, "shape": r.lab.describe(), "rows": r.rows,
                     "checks": {name: list(check) for name, check in r.checks.items()}, "runs": runs})
    Path(path).write_text(json.dumps(labs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--routers", nargs="+",
                        choices=["herd", "herd-agentless", "herd-no-affinity", "round-robin", "least-connections"],
                        help="herd-agentless: herd polling the nodes itself, without herd-node; herd-no-affinity: "
                        "herd with its prompt_affinity setting off")
    parser.add_argument("--slowest", type=int, default=0, help="list herd's N slowest requests")
    parser.add_argument("--rate", type=float, default=RATE, help="arrivals per simulated second")
    parser.add_argument("--studio-context", type=int, default=CONTEXT["studio"],
                        help="studio's default context (4096: every machine at Ollama's old default)")
    parser.add_argument("--generated", type=int, metavar="N",
                        help="replay N generated home labs (seeds 1..N) and check issue 13's targets")
    parser.add_argument("--only", type=int, nargs="+", metavar="SEED", help="with --generated: only these labs")
    parser.add_argument("--save", metavar="PATH", help="with --generated or --conversations: write every lab's "
                        "requests and outcomes as JSON")
    parser.add_argument("--conversations", action="store_true",
                        help="add conversations and agent loops that resend their history, on nodes with per-slot "
                        "prompt caches, and check issue 14's targets (seeds 1-3, or the labs of --generated)")
    parser.add_argument("--multiuser-cache", action="store_true",
                        help="with --conversations: the nodes choose slots as Ollama does with OLLAMA_MULTIUSER_CACHE=1")
    args = parser.parse_args()
    if args.conversations:
        args.routers = args.routers or CONVERSATION_ROUTERS
        return main_conversations(args)
    if args.generated or args.only:
        args.routers = args.routers or ROUTERS
        return main_generated(args)
    args.routers = args.routers or ["herd", "round-robin", "least-connections"]
    return main_classic(args)


if __name__ == "__main__":
    sys.exit(main())

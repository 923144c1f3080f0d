"""Routing benchmark: does herd finish a home lab's requests sooner than the alternatives?

    python tests/bench_routing.py                 # seeds 1 2 3, about 5 minutes
    python tests/bench_routing.py --seeds 4 --routers herd least-connections
    python tests/bench_routing.py --routers herd-agentless    # herd without herd-node, 2 minutes

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
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import herd_node  # noqa: E402
from bench_common import (CONTEXT, DURATION_S, FLEET, RATE, SCALE, free_port, lower_bound,  # noqa: E402
                          mean_p95_p99, pct, sim_node, start_herd, stop, wait_nodes, workload)
from fake_ollama import QuietServer, full_name  # noqa: E402

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

def start_fleet():
    return {name: sim_node(name) for name in FLEET}


def start_herd_on(nodes, data_dir, agents=True):
    """herd in its own process, fed by a herd-node agent per machine, or (agents=False) polling
    each node itself as `--node` (no memory size, slots or default context: what it sees in /api/ps)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_herd(port, data_dir, [] if agents else [(name, node.url) for name, node in nodes.items()],
                      flags=["--queue-timeout", "600"], log_level=HERD_LOG_LEVEL)
    agents = [herd_node.Agent(herd_node.AgentConfig(
        router_url=url, ollama_host=node.url, node_id=name, interval=0.5, num_parallel=FLEET[name][2],
        memory_gb=FLEET[name][0])).start() for name, node in nodes.items()] if agents else []
    wait_nodes(url, len(nodes), calibrated=True)  # herd times each node once when it joins
    return proc, agents, url


def replay(url, plan):
    """Send each request at its arrival time; returns (latency, ttft, ok) per request, sim seconds."""
    pool = urllib3.PoolManager(maxsize=256, retries=False, timeout=urllib3.Timeout(connect=10, read=900))
    results = [None] * len(plan)
    start = time.monotonic()

    def one(index, path, body, stream):
        sent = time.monotonic()
        ttft = None
        try:
            response = pool.request("POST", url + path, body=json.dumps(body).encode(),
                                    headers={"Content-Type": "application/json"}, preload_content=False)
            data = b""
            for chunk in response.stream(None):
                if ttft is None:
                    ttft = time.monotonic() - sent
                data += chunk
            response.release_conn()
            ok = response.status == 200 and b'"error"' not in data[-300:]
        except Exception:  # noqa: BLE001 - a failure is a result here
            ok, response = False, None
        latency = time.monotonic() - sent
        node = response.headers.get("X-Herd-Node") if ok else None
        results[index] = (latency * SCALE, (ttft if stream and ttft else latency) * SCALE, ok, stream, node)

    threads = []
    for index, (arrival, path, body, stream, *_rest) in enumerate(plan):
        delay = arrival / SCALE - (time.monotonic() - start)
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(index, path, body, stream))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return results


def run(router, plan, data_dir):
    nodes = start_fleet()
    proc, agents, proxy = None, [], None
    try:
        if router.startswith("herd"):
            proc, agents, url = start_herd_on(nodes, data_dir, agents=router == "herd")
        else:
            proxy = BaselineProxy({n: (node.url, set(node.models)) for n, node in nodes.items()}, router)
            url = proxy.url
        results = replay(url, plan)
        stats = {}
        for node in nodes.values():
            for key, value in node.stats.items():
                stats[key] = stats.get(key, 0) + value
        return results, stats
    finally:
        for agent in agents:
            agent.stop()
        if proc is not None:
            stop([proc])
        if proxy is not None:
            proxy.stop()
        for node in nodes.values():
            node.stop()


def by_model(plan, results, bound):
    """Mean latency over the lower bound, per model: where the time goes."""
    ratios = {}
    for (_, _, _, _, model, _, _), result, lb in zip(plan, results, bound):
        ratios.setdefault(model, []).append(result[0] / lb)
    return "  ".join(f"{m.removesuffix(':latest')} {statistics.fmean(r):.2f}" for m, r in sorted(ratios.items()))


def summary(results, stats):
    ttfts = [r[1] for r in results if r[3]]
    return {"failures": sum(1 for r in results if not r[2]), **mean_p95_p99([r[0] for r in results]),
            "ttft_p95": pct(ttfts, 95), "loads": stats["loads"], "reloads": stats["reloads"],
            "evictions": stats["evictions"], "needless_reloads": stats["needless_reloads"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--routers", nargs="+", default=["herd", "round-robin", "least-connections"],
                        choices=["herd", "herd-agentless", "round-robin", "least-connections"],
                        help="herd-agentless: herd polling the nodes itself, without herd-node")
    parser.add_argument("--slowest", type=int, default=0, help="list herd's N slowest requests")
    parser.add_argument("--rate", type=float, default=RATE, help="arrivals per simulated second")
    parser.add_argument("--studio-context", type=int, default=CONTEXT["studio"],
                        help="studio's default context (4096: every machine at Ollama's old default)")
    args = parser.parse_args()
    CONTEXT["studio"] = args.studio_context
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
            results, stats = run(router, plan, Path(tempfile.mkdtemp(prefix="herd-routing-")))
            row = rows[router] = summary(results, stats)
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


if __name__ == "__main__":
    sys.exit(main())

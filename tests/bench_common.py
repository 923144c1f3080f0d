"""What the benchmarks share: loopback ports, the processes they start, percentiles, and the
simulated home lab that bench_routing.py and bench_routing_floor.py replay.

Every benchmark runs its fake nodes and routers in processes of their own on 127.0.0.1, as a home
lab runs them on machines of their own; the client runs in the benchmark's process.
"""

from __future__ import annotations

import json
import math
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import urllib3

from sim_ollama import PREFILL_FACTOR, SimNode

ROOT = Path(__file__).resolve().parent.parent


# -- ports and processes -----------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url, timeout=20):
    """Return once GET `url` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib3.request("GET", url, timeout=1, retries=False).status == 200:
                return
        except urllib3.exceptions.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def start_process(script, *args, ready_url):
    """Run a Python file of this repository in its own process; return it once `ready_url` answers."""
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(ready_url)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"{' '.join(command)} did not come up (exit code {proc.wait()})") from None
    return proc


def start_fake(port, models=("llama3.2",), loaded=("llama3.2",), tokens=5, token_delay=0.0):
    """A fake Ollama (tests/fake_ollama.py) on `port`."""
    return start_process("tests/fake_ollama.py", "--port", port, "--models", ",".join(models),
                         "--loaded", ",".join(loaded), "--tokens", tokens, "--token-delay", token_delay,
                         ready_url=f"http://127.0.0.1:{port}/api/version")


def start_herd(port, data_dir, nodes=(), flags=(), log_level="WARNING"):
    """herd on `port`, polling `nodes` [(name, url)] itself, with `flags` added to its command line.
    Returns once it answers; wait_nodes tells when it sees its fleet."""
    node_args = [arg for name, url in nodes for arg in ("--node", f"{name}={url}")]
    return start_process("herd.py", "--host", "127.0.0.1", "--port", port, "--no-mdns", "--no-local",
                         "--data-dir", data_dir, "--log-level", log_level, *node_args, *flags,
                         ready_url=f"http://127.0.0.1:{port}/")


def wait_nodes(base, count, calibrated=False, timeout=20):
    """Return once herd at `base` sees `count` nodes online (and, if asked, timed by its calibration)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = json.loads(urllib3.request("GET", base + "/fleet/status").data)["nodes"]
        ready = [n for n in nodes if n["status"] == "online" and (n["decode_gbs"] or not calibrated)]
        if len(ready) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"herd did not see {count} nodes {'calibrated' if calibrated else 'online'}: {nodes}")
        time.sleep(0.1)


def stop(procs, timeout=30):
    """SIGTERM each process (herd writes its queued trace rows on it), then wait for all."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=timeout)


# -- percentiles -------------------------------------------------------------------------------

def pct(values, q):
    """The q-th percentile by nearest rank: the smallest value with q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def mean_p95_p99(values):
    """Mean, p95 and p99 of `values`."""
    return {"mean": statistics.fmean(values), "p95": pct(values, 95), "p99": pct(values, 99)}


# -- the simulated home lab (bench_routing, bench_routing_floor) --------------------------------

SCALE = 10.0  # simulated seconds per real second
DURATION_S = 300.0  # simulated seconds of arrivals
RATE = 0.4  # requests per simulated second: a busy evening in a home lab

MODELS = {"llama3.2:3b": 2.0, "qwen2.5:7b": 4.7, "llama3.1:8b": 4.9, "qwen2.5:32b": 19.9,
          "llama3.3:70b": 42.5, "nomic-embed-text:latest": 0.3}
SMALL = ["llama3.2:3b", "qwen2.5:7b", "llama3.1:8b", "nomic-embed-text:latest"]
# name: memory GB, bandwidth GB/s, parallel slots, load GB/s, installed (every model that fits,
# as a home lab pulls them), loaded at start
FLEET = {
    "studio": (192, 800, 4, 4.0, list(MODELS), ["llama3.3:70b", "qwen2.5:32b", "llama3.1:8b", "nomic-embed-text:latest"]),
    "rtx": (24, 1000, 2, 3.0, SMALL + ["qwen2.5:32b"], ["qwen2.5:7b", "llama3.2:3b", "nomic-embed-text:latest"]),
    "mini": (16, 50, 1, 1.0, SMALL, ["llama3.2:3b"]),  # a CPU-only mini PC: DDR5 bandwidth
    "laptop": (64, 400, 1, 2.0, list(MODELS), ["llama3.1:8b", "nomic-embed-text:latest"]),
}
# the big machine runs with a larger default context (recent Ollama picks one by VRAM, or its owner
# set OLLAMA_CONTEXT_LENGTH); its agent is not told: herd sees it in /api/ps. The others run 4096.
CONTEXT = {"studio": 32768}
# model, share of requests, prompt tokens (range), output tokens (range)
MIX = [("llama3.2:3b", 0.32, (100, 1500), (50, 250)), ("qwen2.5:7b", 0.22, (100, 1500), (80, 300)),
       ("llama3.1:8b", 0.14, (200, 2000), (80, 300)), ("qwen2.5:32b", 0.025, (300, 3000), (100, 400)),
       ("llama3.3:70b", 0.015, (300, 3000), (100, 400)), ("nomic-embed-text:latest", 0.28, (20, 500), (0, 0))]


def sim_node(name, loaded=None):
    """Machine `name` of FLEET as a running simulated node, with its start-up models loaded
    unless `loaded` says otherwise."""
    memory, bandwidth, parallel, load, installed, loaded_at_start = FLEET[name]
    return SimNode(name, memory, bandwidth, {m: MODELS[m] for m in installed},
                   loaded_at_start if loaded is None else loaded, num_parallel=parallel, load_gbs=load,
                   scale=SCALE, gpu=name != "mini", default_ctx=CONTEXT.get(name, 4096)).start()


def workload(seed, rate=RATE):
    """The seeded list of requests: (arrival s, path, body, streaming, model, prompt, output)."""
    rng = random.Random(seed)
    t, plan = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > DURATION_S:
            return plan
        model, _, prompt_range, out_range = rng.choices(MIX, weights=[m[1] for m in MIX])[0]
        prompt = rng.randint(*prompt_range)
        out = rng.randint(*out_range) if out_range[1] else 0
        text = "word " * (prompt * 4 // 5)  # about four characters a token
        openai = rng.random() < 0.5
        stream = rng.random() < 0.6
        if out == 0:
            path = "/v1/embeddings" if openai else "/api/embed"
            body, stream = {"model": model, "input": text}, False
        elif openai:
            path = "/v1/chat/completions"
            body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": out,
                    "stream": stream}
        else:
            path = "/api/chat"
            options = {"num_predict": out}
            roll = rng.random()
            if roll < 0.06:
                options["num_ctx"] = 16384  # a long-document request
            elif roll < 0.20:
                options["num_ctx"] = rng.choice([2048, 4096])  # a client that always sets it
            body = {"model": model, "messages": [{"role": "user", "content": text}], "options": options,
                    "stream": stream}
        plan.append((t, path, body, stream, model, prompt, out))


def lower_bound(plan):
    """Each request alone on the fastest node that has its model, already loaded (sim seconds)."""
    bounds = []
    for _, _, _, _, model, prompt, out in plan:
        best = max(spec[1] / MODELS[model] for spec in FLEET.values() if model in spec[4])
        bounds.append(prompt / (best * PREFILL_FACTOR) + out / best)
    return bounds

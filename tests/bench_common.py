"""What the benchmarks share: loopback ports, the processes they start, percentiles, and the
simulated home labs that bench_routing.py and bench_routing_floor.py replay (the classic one, and
generated ones drawn from a seed), their workloads (single requests; with --conversations also
conversations and agent loops that resend their history), their capacity and their lower bounds.

Every benchmark runs its fake nodes and routers in processes of their own on 127.0.0.1, as a home
lab runs them on machines of their own; the client runs in the benchmark's process.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import urllib3

from sim_ollama import DEFAULT_CTX, KV_SHARE_PER_4K, REPLY_WORDS, Physics, SimNode

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
    """SIGTERM each process (herd writes its queued trace rows on it), then wait for all; kill
    one that is still there after `timeout`."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


@dataclass(frozen=True)
class Machine:
    """One machine of a simulated home lab."""

    memory_gb: float  # VRAM, unified memory, or the RAM of a CPU-only machine
    bandwidth_gbs: float
    slots: int  # OLLAMA_NUM_PARALLEL
    load_gbs: float  # how fast a load reads weights from disk
    installed: tuple  # every model of the lab that fits, as a home lab pulls them
    loaded: tuple  # at start
    default_ctx: int = 4096  # OLLAMA_CONTEXT_LENGTH; its agent is not told (herd sees it in /api/ps)
    gpu: bool = True
    offload_gb: float = 0.0  # system RAM that takes the layers of a model larger than the VRAM...
    cpu_gbs: float = 60.0  # ...and streams them this fast
    prefill_factor: float | None = None  # its own prompt rate over decode (None: the lab's physics')

    @property
    def budget_gb(self):
        """What its herd-node agent is told: the memory Ollama may fill there."""
        return self.memory_gb + self.offload_gb

    def describe(self):
        memory = f"{self.memory_gb:g}" + (f"+{self.offload_gb:g} RAM" if self.offload_gb else "")
        return (f"{memory} GB {self.bandwidth_gbs:g} GB/s {self.slots} slot{'s' if self.slots > 1 else ''} "
                f"ctx {self.default_ctx // 1024}k{'' if self.gpu else ' CPU'}")


@dataclass(frozen=True)
class Traffic:
    """What the clients of a home lab send (see workload)."""

    mix: tuple  # (model, share, prompt tokens range, output tokens range); output (0, 0): embeddings
    rate: float  # mean arrivals per simulated second
    duration_s: float
    stream_share: float = 0.6
    openai_share: float = 0.5
    ctx_large_share: float = 0.06  # of native chats: num_ctx ctx_large (a long document)
    ctx_large: int = 16384
    ctx_small_share: float = 0.14  # of native chats: num_ctx one of ctx_small (a client that always sets it)
    ctx_small: tuple = (2048, 4096)
    phases: tuple = ()  # (start s, end s, rate multiplier): bursts and idle gaps; none: Poisson throughout
    numbered: bool = False  # prompts start with "#<index> ": the nodes record where each one's time went

    def num_ctx_share(self):
        """The share of all requests that set num_ctx (only native chats can)."""
        chats = sum(share for _, share, _, out in self.mix if out[1]) / sum(share for _, share, _, _ in self.mix)
        return chats * (1 - self.openai_share) * (self.ctx_large_share + self.ctx_small_share)


@dataclass(frozen=True)
class HomeLab:
    """Machines, models, traffic and the physics their simulated nodes follow."""

    name: str
    machines: dict  # name -> Machine
    models: dict  # name -> GB of weights
    traffic: Traffic
    physics: Physics = field(default_factory=Physics)
    load: float | None = None  # offered load: the arrival rate over the fleet's capacity
    # the nodes keep Ollama's per-slot prompt caches and stream a reply's first token at once
    # (the conversations benchmark; see tests/sim_ollama.py)
    prompt_caches: bool = False
    multiuser_cache: bool = False  # ...choosing slots as Ollama does with OLLAMA_MULTIUSER_CACHE=1

    def describe(self):
        traffic = self.traffic
        nodes = "; ".join(f"{name} {m.describe()}" for name, m in self.machines.items())
        mix = ", ".join(f"{model.removesuffix(':latest')} {share / sum(s for _, s, _, _ in traffic.mix):.0%}"
                        for model, share, _, _ in traffic.mix)
        rate = f"{traffic.rate:.2f}/s" + (" bursty" if traffic.phases else " Poisson")
        load = f" (load {self.load:.2f} of capacity)" if self.load else ""
        offload = ", CPU offload" if any(m.offload_gb for m in self.machines.values()) else ""
        if any(m.prefill_factor for m in self.machines.values()):
            offload += ", prompt rates " + " ".join(f"{name} {m.prefill_factor:g}x" for name, m in self.machines.items()
                                                    if m.prefill_factor)
        if self.prompt_caches:
            offload += ", per-slot prompt caches" + (" (OLLAMA_MULTIUSER_CACHE)" if self.multiuser_cache else "")
        return [f"nodes: {nodes}", f"models: {mix}",
                (f"traffic: {rate}{load} for {traffic.duration_s:g} s, streaming {traffic.stream_share:.0%}, "
                 f"OpenAI {traffic.openai_share:.0%}, num_ctx {traffic.num_ctx_share():.1%} (long {traffic.ctx_large})"),
                f"physics: {self.physics.describe()}{offload}"]


def classic_lab(rate=RATE):
    """The home lab of the three-seed benchmark: FLEET, MODELS, MIX and CONTEXT above."""
    machines = {name: Machine(memory, bandwidth, parallel, load, tuple(installed), tuple(loaded),
                              default_ctx=CONTEXT.get(name, 4096), gpu=name != "mini")
                for name, (memory, bandwidth, parallel, load, installed, loaded) in FLEET.items()}
    return HomeLab("classic", machines, MODELS, Traffic(tuple(MIX), rate, DURATION_S))


def sim_node(name, loaded=None, lab=None):
    """Machine `name` of `lab` (default: the classic one) as a running simulated node, with its
    start-up models loaded unless `loaded` says otherwise."""
    lab = lab or classic_lab()
    machine = lab.machines[name]
    return SimNode(name, machine.memory_gb, machine.bandwidth_gbs, {m: lab.models[m] for m in machine.installed},
                   machine.loaded if loaded is None else loaded, num_parallel=machine.slots,
                   load_gbs=machine.load_gbs, scale=SCALE, gpu=machine.gpu, default_ctx=machine.default_ctx,
                   physics=lab.physics, offload_gb=machine.offload_gb, cpu_gbs=machine.cpu_gbs,
                   prefill_factor=machine.prefill_factor, prompt_cache=lab.prompt_caches,
                   multiuser_cache=lab.multiuser_cache, first_token_alone=lab.prompt_caches).start()


class Request(NamedTuple):
    """One request of a workload; times in simulated seconds, tokens as the node counts them."""

    arrival: float
    path: str
    body: dict
    stream: bool
    model: str
    prompt: int
    out: int


def next_arrival(rng, t, traffic):
    """The next arrival after `t`: Poisson at traffic.rate, its rate multiplied in each phase."""
    if not traffic.phases:
        return t + rng.expovariate(traffic.rate)
    left = rng.expovariate(1.0)  # the arrival process in its own time, where the rate is 1
    for start, end, multiplier in traffic.phases:
        if end <= t:
            continue
        t = max(t, start)
        rate = traffic.rate * multiplier
        if rate and left <= (end - t) * rate:
            return t + left / rate
        left -= (end - t) * rate
        t = end
    return math.inf


def workload(seed, rate=RATE, lab=None):
    """The seeded list of Requests `lab`'s clients send (default: the classic lab at `rate`)."""
    traffic = (lab or classic_lab(rate)).traffic
    rng = random.Random(seed)
    t, plan = 0.0, []
    while True:
        t = next_arrival(rng, t, traffic)
        if t > traffic.duration_s:
            return plan
        model, _, prompt_range, out_range = rng.choices(traffic.mix, weights=[m[1] for m in traffic.mix])[0]
        prompt = rng.randint(*prompt_range)
        out = rng.randint(*out_range) if out_range[1] else 0
        text = "word " * (prompt * 4 // 5)  # about four characters a token
        if traffic.numbered:
            text = f"#{len(plan)} " + text
            prompt = max(1, len(text) // 4)  # what the node counts
        openai = rng.random() < traffic.openai_share
        stream = rng.random() < traffic.stream_share
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
            if roll < traffic.ctx_large_share:
                options["num_ctx"] = traffic.ctx_large  # a long-document request
            elif roll < traffic.ctx_large_share + traffic.ctx_small_share:
                options["num_ctx"] = rng.choice(traffic.ctx_small)  # a client that always sets it
            body = {"model": model, "messages": [{"role": "user", "content": text}], "options": options,
                    "stream": stream}
        plan.append(Request(t, path, body, stream, model, prompt, out))


# -- generated home labs (bench_routing --generated) -------------------------------------------
#
# Each seed draws a home lab over wide ranges, so that no one fleet, mix or formula is the truth:
# 2-6 machines (GPU boxes, Apple-style unified memory, CPU-only mini PCs) with 8-192 GB at
# 50-1000 GB/s, 1-4 slots, loads at 1-5 GB/s and default contexts of 4k, 8k or 32k; 1-5 chat
# models from 1B to 70B, most often with an embedding model; streaming 0-100%, num_ctx 0-10%;
# arrivals with bursts and idle gaps; and physics: side by side 1/m or a fixed penalty, batching
# n^-0 to n^-0.5, load start-up 0.5-5 s, prefill 10-40x decode, and in some labs CPU offload of
# models larger than a GPU's VRAM. The mean rate is the fleet's capacity times an offered load
# drawn from 0.1-0.5, and must come out between 0.5 and 5 requests/s (else the lab is drawn again).

CATALOGUE = {"llama3.2:1b": 1.3, "llama3.2:3b": 2.0, "qwen2.5:7b": 4.7, "llama3.1:8b": 4.9, "gemma2:9b": 5.4,
             "phi4:14b": 9.1, "mistral-small:24b": 14.1, "gemma2:27b": 16.0, "qwen2.5:32b": 19.9,
             "llama3.3:70b": 42.5}
EMBEDDERS = {"nomic-embed-text:latest": 0.3, "mxbai-embed-large:latest": 0.7, "bge-m3:latest": 1.2}
# kind: (how common, memory GB to pick from, bandwidth GB/s range, has a GPU)
KINDS = {"gpu": (0.45, (8, 12, 16, 24, 32, 48), (250, 1000), True),
         "mac": (0.35, (16, 24, 32, 48, 64, 96, 128, 192), (100, 800), True),
         "cpu": (0.20, (8, 16, 32, 64), (50, 100), False)}
GENERATED_SECONDS = (60, 120)  # simulated seconds of arrivals
GENERATED_LOAD = (0.1, 0.5)
GENERATED_RATE = (0.5, 5.0)
START_FILL = 0.7  # models loaded at start take up to this share of a machine's memory


def footprint(size, ctx):
    """GB a model of `size` GB takes loaded with `ctx` (as tests/sim_ollama.py counts it)."""
    return size * (1 + KV_SHARE_PER_4K * ctx / DEFAULT_CTX)


def generated_lab(seed):
    """The home lab of generated scenario `seed`."""
    rng = random.Random(f"home-lab-{seed}")
    while True:
        lab = draw_lab(rng, f"generated {seed}")
        if lab is not None:
            return lab


def draw_lab(rng, name):
    """One draw of a home lab, or None when it comes out outside the ranges (see above)."""
    physics = Physics(side_by_side=1.0 if rng.random() < 0.5 else round(rng.uniform(0.2, 0.8), 2),
                      batch_exponent=round(rng.uniform(0, 0.5), 2), load_fixed_s=round(rng.uniform(0.5, 5), 1),
                      prefill_factor=round(rng.uniform(10, 40)), fluid=True)
    offload = rng.random() < 0.4
    chats = rng.sample(sorted(CATALOGUE), rng.randint(1, 5))
    if min(CATALOGUE[m] for m in chats) > 5:  # every lab has a small chat model
        chats[0] = rng.choice([m for m, size in CATALOGUE.items() if size <= 5 and m not in chats])
    shares = {m: rng.uniform(0.2, 1) / math.sqrt(CATALOGUE[m]) for m in chats}
    total = sum(shares.values())
    shares = {m: share / total for m, share in shares.items()}
    ranges = {}
    for m in chats:
        low = rng.randint(20, 300)
        out_low = rng.randint(10, 120)
        ranges[m] = ((low, rng.randint(max(low + 50, 400), 4000)), (out_low, rng.randint(out_low + 40, 600)))
    models = {m: CATALOGUE[m] for m in chats}
    if rng.random() < 0.7:
        embedder = rng.choice(sorted(EMBEDDERS))
        embed_share = rng.uniform(0.1, 0.35)
        shares = {m: share * (1 - embed_share) for m, share in shares.items()}
        shares[embedder] = embed_share
        ranges[embedder] = ((10, rng.randint(100, 1000)), (0, 0))
        models[embedder] = EMBEDDERS[embedder]
    stream_share = round(rng.random(), 2)
    openai_share = round(rng.uniform(0.2, 0.8), 2)
    ctx_share, long_part = rng.uniform(0, 0.10), rng.uniform(0.3, 0.7)
    ctx_large = rng.choices((8192, 16384, 32768), weights=(0.35, 0.45, 0.2))[0]
    native_chats = sum(shares[m] for m in chats) * (1 - openai_share)
    ctx_large_share = ctx_share * long_part / native_chats
    ctx_small_share = ctx_share * (1 - long_part) / native_chats

    machines = {}
    for index in range(1, rng.randint(2, 6) + 1):
        kind = rng.choices(list(KINDS), weights=[k[0] for k in KINDS.values()])[0]
        _, memories, (low, high), gpu = KINDS[kind]
        memory = rng.choice(memories)
        machine = Machine(
            memory_gb=memory, bandwidth_gbs=round(math.exp(rng.uniform(math.log(low), math.log(high)))),
            slots=rng.choices((1, 2, 3, 4), weights=(0.35, 0.3, 0.15, 0.2))[0],
            load_gbs=round(rng.uniform(1, 5), 1), installed=(), loaded=(),
            default_ctx=rng.choices((4096, 8192, 32768), weights=(0.5, 0.25, 0.25))[0], gpu=gpu,
            offload_gb=rng.choice((16, 32, 64)) if offload and kind == "gpu" else 0.0,
            cpu_gbs=round(rng.uniform(40, 90)))
        largest_ctx = max(machine.default_ctx, ctx_large)  # every model it has serves every request
        installed = [m for m in models if footprint(models[m], largest_ctx) <= machine.budget_gb]
        in_vram = [m for m in installed if footprint(models[m], machine.default_ctx) <= memory]
        hot_chats = sorted((m for m in in_vram if m in chats), key=models.get)
        if not hot_chats:
            continue  # nothing to chat with: not a machine a home lab would add
        loaded = [hot_chats[0]]  # herd times each machine on a hot chat model when it joins
        rest = [m for m in in_vram if m != hot_chats[0]]
        rng.shuffle(rest)
        for m in rest:
            if sum(footprint(models[x], machine.default_ctx) for x in loaded + [m]) <= START_FILL * memory:
                loaded.append(m)
        machines[f"{kind}{index}"] = replace(machine, installed=tuple(installed), loaded=tuple(loaded))
    homeless = [m for m in models if not any(m in machine.installed for machine in machines.values())]
    if len(machines) < 2 or homeless:
        return None
    mix = tuple((m, shares[m], *ranges[m]) for m in models)
    duration = round(rng.uniform(*GENERATED_SECONDS))
    phases = draw_phases(rng, duration)
    load = rng.uniform(*GENERATED_LOAD)
    traffic = Traffic(mix, 1.0, duration, stream_share, openai_share, ctx_large_share, ctx_large,
                      ctx_small_share, (2048, 4096), phases, numbered=True)
    lab = HomeLab(name, machines, models, traffic, physics, load)
    rate = load * capacity(lab)
    if not GENERATED_RATE[0] <= rate <= GENERATED_RATE[1]:
        return None
    return replace(lab, traffic=replace(traffic, rate=rate))


def draw_phases(rng, duration):
    """Arrival phases over `duration`: steady stretches, bursts at 3-5x and idle gaps, scaled
    so that the mean rate is the traffic's rate."""
    burst, idle = rng.uniform(0.1, 0.35), rng.uniform(0.05, 0.25)
    t, kind, phases = 0.0, "steady", []
    while t < duration:
        if kind == "burst":
            length, multiplier = rng.uniform(3, 10), rng.uniform(3, 5)
        elif kind == "idle":
            length, multiplier = rng.uniform(5, 20), 0.0
        else:
            length, multiplier = rng.uniform(10, 30), 1.0
        phases.append((t, min(duration, t + length), multiplier))
        t += length
        roll = rng.random()
        kind = "burst" if roll < burst else "idle" if roll < burst + idle else "steady"
    mean = sum((end - start) * m for start, end, m in phases) / duration
    return tuple((start, end, m / mean) for start, end, m in phases)


# -- conversations and agent loops (bench_routing --conversations) ------------------------------
#
# A chat client resends the whole conversation with every turn, and an agent its fixed prompt and
# everything its tools returned: cheap only on the node whose slot cache still holds that history
# (the prompt caches in tests/sim_ollama.py). Drawn per lab and seed, beside the lab's own single
# requests over the same window:
# - conversations (2.5 per machine): 3-30 turns (log-uniform, so most are short), each a user
#   message of 20-400 tokens and a reply of 50-500, 5-60 s of thinking after each reply
#   (log-uniform); half open with one of two system prompts of 2-8k tokens that the lab's
#   conversations share (an app's preset), the others with a short one of their own (20-300);
# - agent loops (0.75 per machine): a fixed prompt of 3-10k tokens (instructions, tools, a
#   repository map), a task of 20-200 tokens, then 5-20 steps 1-5 s apart, each adding the
#   model's reply (30-200 tokens) and a tool's output (50-1500 tokens).
# Each keeps one model (drawn by the lab's chat shares) and one API (by the lab's OpenAI share),
# streams, and never sets num_ctx. Each is planned to end within 70% of the window: think times
# that would not fit are shortened, never below their minimum, and the start is drawn in what is
# left. Every text is made of 4-character words, one token each, so messages end on token
# boundaries. The nodes keep Ollama's per-slot prompt caches, send a reply's first token at once,
# and evaluate prompts at a rate of their own by kind of machine (relative to their decode speed:
# a GPU box 30-60x, an Apple-style machine 8-16x, a CPU-only one 4-8x; the classic lab's rtx 40x,
# studio and laptop 10x, mini 5x).

CONVERSATION_WINDOW_S = 300.0  # simulated seconds of single requests, and of planned conversations
PLANNED_SHARE = 0.7  # conversations and loops are planned to end within this share of the window
CONVERSATIONS_PER_MACHINE = 2.5
AGENTS_PER_MACHINE = 0.75
TURNS = (3, 30)
THINK_S = (5.0, 60.0)
USER_TOKENS = (20, 400)
REPLY_TOKENS = (50, 500)
SHARED_SYSTEMS = 2  # system prompts the conversations of a lab share...
SHARED_SYSTEM_TOKENS = (2000, 8000)
SHARED_SYSTEM_SHARE = 0.5  # ...and the share of conversations that open with one
OWN_SYSTEM_TOKENS = (20, 300)
AGENT_PROMPT_TOKENS = (3000, 10000)
AGENT_TASK_TOKENS = (20, 200)
AGENT_STEPS = (5, 20)
AGENT_GAP_S = (1.0, 5.0)
AGENT_REPLY_TOKENS = (30, 200)
TOOL_TOKENS = (50, 1500)
PREFILL_BY_KIND = {"gpu": (30, 60), "mac": (8, 16), "cpu": (4, 8)}  # prompt rate over decode speed
CLASSIC_PREFILL = {"studio": 10, "rtx": 40, "mini": 5, "laptop": 10}


@dataclass(frozen=True)
class Conversation:
    """A client that talks to one model over several requests, each sending the whole history:
    system prompt, then per request the message it adds and the reply it got (see replay in
    bench_routing.py)."""

    index: int
    kind: str  # chat (a person) | agent (a tool loop)
    model: str
    openai: bool
    start: float  # simulated seconds from the start of the run
    system: str
    shared: int | None  # which of the lab's shared system prompts it opens with, if any
    said: tuple  # per request, the message added before it: (role, text)
    outs: tuple  # per request, the reply's tokens (num_predict / max_tokens)
    gaps: tuple  # per request after the first, simulated seconds after the previous reply


def words(rng, tokens):
    """Text of `tokens` tokens: 4-character words drawn from `rng`."""
    return "".join(rng.choices(REPLY_WORDS, k=tokens))


def log_uniform(rng, low, high):
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def fit_gaps(gaps, budget, low):
    """`gaps` shortened (each at least `low`, in proportion to what it has above it) to sum to at most `budget`."""
    excess = sum(gaps) - budget
    if excess <= 0:
        return gaps
    room = sum(g - low for g in gaps)
    return [low + (g - low) * max(0.0, room - excess) / room for g in gaps]


def conversation_lab(lab, seed, multiuser_cache=False):
    """`lab` as the conversations benchmark runs it: per-slot prompt caches (choosing slots as
    OLLAMA_MULTIUSER_CACHE=1 does, if asked), a prompt rate per machine, and its single requests
    (numbered, so no two share a prefix) over the window."""
    rng = random.Random(f"prompt-rates-{seed}")
    machines = {}
    for name, machine in lab.machines.items():
        kind = name.rstrip("0123456789")
        factor = CLASSIC_PREFILL[name] if name in CLASSIC_PREFILL else round(rng.uniform(*PREFILL_BY_KIND[kind]))
        machines[name] = replace(machine, prefill_factor=factor)
    traffic = replace(lab.traffic, duration_s=CONVERSATION_WINDOW_S, numbered=True)
    if traffic.phases:
        traffic = replace(traffic, phases=draw_phases(rng, CONVERSATION_WINDOW_S))
    return replace(lab, machines=machines, traffic=traffic, prompt_caches=True, multiuser_cache=multiuser_cache)


def conversations(seed, lab):
    """The seeded conversations and agent loops of `lab`'s clients (see above)."""
    rng = random.Random(f"conversations-{seed}")
    chats = [(model, share) for model, share, _, out in lab.traffic.mix if out[1]]
    models, weights = [m for m, _ in chats], [w for _, w in chats]
    budget = PLANNED_SHARE * lab.traffic.duration_s
    shared = [words(rng, rng.randint(*SHARED_SYSTEM_TOKENS)) for _ in range(SHARED_SYSTEMS)]
    plan = []
    for _ in range(round(CONVERSATIONS_PER_MACHINE * len(lab.machines))):
        turns = round(log_uniform(rng, *TURNS))
        gaps = fit_gaps([log_uniform(rng, *THINK_S) for _ in range(turns - 1)], budget, THINK_S[0])
        which = rng.randrange(SHARED_SYSTEMS) if rng.random() < SHARED_SYSTEM_SHARE else None
        system = shared[which] if which is not None else words(rng, rng.randint(*OWN_SYSTEM_TOKENS))
        plan.append(Conversation(
            len(plan), "chat", rng.choices(models, weights)[0], rng.random() < lab.traffic.openai_share,
            rng.uniform(0, budget - sum(gaps)), system, which,
            tuple(("user", words(rng, rng.randint(*USER_TOKENS))) for _ in range(turns)),
            tuple(rng.randint(*REPLY_TOKENS) for _ in range(turns)), tuple(gaps)))
    for _ in range(round(AGENTS_PER_MACHINE * len(lab.machines))):
        steps = rng.randint(*AGENT_STEPS)
        gaps = fit_gaps([rng.uniform(*AGENT_GAP_S) for _ in range(steps - 1)], budget, AGENT_GAP_S[0])
        said = [("user", words(rng, rng.randint(*AGENT_TASK_TOKENS)))]
        said += [("tool", words(rng, rng.randint(*TOOL_TOKENS))) for _ in range(steps - 1)]
        plan.append(Conversation(
            len(plan), "agent", rng.choices(models, weights)[0], rng.random() < lab.traffic.openai_share,
            rng.uniform(0, budget - sum(gaps)), words(rng, rng.randint(*AGENT_PROMPT_TOKENS)), None, tuple(said),
            tuple(rng.randint(*AGENT_REPLY_TOKENS) for _ in range(steps)), tuple(gaps)))
    return plan


# -- what the fleet could do: capacity and lower bounds ----------------------------------------

def alone_tps(machine, size, ctx):
    """Decode tokens/s of one stream of a `size` GB model alone on `machine`, loaded at `ctx`
    (the share of an offloaded model in system RAM at CPU speed)."""
    need = footprint(size, ctx)
    if need <= machine.memory_gb:
        return machine.bandwidth_gbs / size
    gpu_share = machine.memory_gb / need
    return 1 / (size * (gpu_share / machine.bandwidth_gbs + (1 - gpu_share) / machine.cpu_gbs))


def fastest_tps(lab, machine, model, openai=False):
    """The fastest a stream of `model` can run alone on `machine`: at the smallest context it may
    be loaded with there (a router may set any num_ctx on a native request; an OpenAI one runs at
    the machine's default). Only an offloaded model runs slower at a larger context."""
    ctx = machine.default_ctx if openai else min(machine.default_ctx, *lab.traffic.ctx_small)
    return alone_tps(machine, lab.models[model], ctx)


def capacity(lab):
    """Requests per second the fleet could serve at most, with every slot busy and no load:
    the largest rate at which every set of models has enough bandwidth on the machines that hold
    them (Hall's condition for sending each model's work to its machines). A machine streams
    slots ^ (1 - batch_exponent) times its speed alone; for a set of models, at the speed of the
    slowest of them it holds (an offloaded model streams slower)."""
    shares = {model: share for model, share, _, _ in lab.traffic.mix}
    total = sum(shares.values())
    batch = 1 - lab.physics.batch_exponent
    demand = {}  # GB streamed per request, on average
    for model, share, prompt, out in lab.traffic.mix:
        work = sum(prompt) / 2 / lab.physics.prefill_factor + sum(out) / 2
        demand[model] = share / total * work * lab.models[model]
    best = math.inf
    for count in range(1, len(demand) + 1):
        for subset in itertools.combinations(demand, count):
            supply = 0.0
            for machine in lab.machines.values():
                held = [m for m in subset if m in machine.installed]
                if held:
                    supply += min(fastest_tps(lab, machine, m) * lab.models[m] for m in held) * machine.slots ** batch
            best = min(best, supply / sum(demand[m] for m in subset))
    return best


def lower_bound(plan, lab=None):
    """Each request alone on the fastest node that has its model, already loaded (sim seconds)."""
    lab = lab or classic_lab()
    prefill = lab.physics.prefill_factor
    best_of = {(model, openai): max(fastest_tps(lab, machine, model, openai) for machine in lab.machines.values()
                                    if model in machine.installed)
               for model, openai in {(r.model, r.path.startswith("/v1/")) for r in plan}}
    bounds = []
    for _, path, _, _, model, prompt, out in plan:
        best = best_of[model, path.startswith("/v1/")]
        bounds.append(prompt / (best * prefill) + out / best)
    return bounds


@dataclass
class Bound:
    """What no router can beat on a workload: mean and p95 latency (sim seconds)."""

    mean: float
    p95: float
    alone_mean: float  # of `alone`: each request alone on the fastest node with its model hot
    alone_p95: float
    alone: list


def bounds(plan, lab):
    """The lower bound of `plan` on `lab`: each request alone on its fastest node, and under fluid
    physics also the queueing that no placement avoids (see queueing_bound)."""
    alone = lower_bound(plan, lab)
    summary = mean_p95_p99(alone)
    if not lab.physics.fluid:
        return Bound(summary["mean"], summary["p95"], summary["mean"], summary["p95"], alone)
    mean, p95 = queueing_bound(plan, lab, alone)
    return Bound(mean, p95, summary["mean"], summary["p95"], alone)


def queueing_bound(plan, lab, alone):
    """(mean, p95) latency that no router can beat, counting the queueing no placement avoids.

    Why it is a bound. Measure a request of model M in work: its prompt tokens / prefill_factor
    plus its output tokens. Under fluid physics a stream of M on machine j does work at most at
    v_j (its speed alone there: bandwidth / size, slower when offloaded), and n streams of M there
    at most at n ^ (1 - batch_exponent) x v_j in all: other models running beside them only slow
    them, and the node runs at most `slots` of M at once. So whatever the routing, loads and
    sharing, M's requests are served at a total rate of at most C = sum over the machines that
    hold M of slots_j ^ (1 - batch_exponent) x v_j. Serving them is then a schedule for one
    server of speed C that may split itself between requests. On such a server SRPT (always the
    request with the least work left) leaves the fewest requests unfinished at every moment
    (Schrage, 1968), so N(t), M's requests in the fleet at time t, is at least N_srpt(t). It is
    also at least N_alone(t): requests that arrived less than their alone time ago. The sum of
    latencies is the integral of N(t), hence at least the integral of max(N_srpt, N_alone), summed
    over models; divided by the number of requests it bounds the mean.

    For the p95: at time t at least N_srpt(t) - A(t - x, t] requests of M that arrived at or
    before t - x are unfinished (A: M's arrivals in that window), and each takes longer than x;
    so do the requests B whose alone time is at least x. At least
    max(|B|, |B| + N_srpt(t) - A(t - x, t] - |B arrived by t - x|) requests of M take x or more,
    for every t. Summed over models, when this reaches the number of requests at or above the
    p95's rank, the p95 is at least x; the bound is the largest such x (a binary search).
    """
    by_model = {}
    for request, alone_s in zip(plan, alone):
        by_model.setdefault(request.model, []).append((request.arrival, request.prompt / lab.physics.prefill_factor
                                                       + request.out, alone_s))
    batch = 1 - lab.physics.batch_exponent
    area, queues = 0.0, []
    for model, jobs in by_model.items():
        rate = sum(fastest_tps(lab, machine, model) * machine.slots ** batch
                   for machine in lab.machines.values() if model in machine.installed)
        departures = srpt_departures([(a, work) for a, work, _ in jobs], rate)
        area += area_of_max([a for a, _, _ in jobs], departures, [a + s for a, _, s in jobs])
        queues.append((sorted(a for a, _, _ in jobs), departures, jobs))
    n = len(plan)
    rank = min(n, math.ceil(0.95 * n))  # pct()'s nearest rank
    need = n - rank + 1  # requests at or above the p95
    low, high = pct(alone, 95), max(departures[-1] for _, departures, _ in queues)
    if slower_than(low, queues) >= need:
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if slower_than(middle, queues) >= need else (low, middle)
    return area / n, low


def srpt_departures(jobs, rate):
    """Departure times of `jobs` [(arrival, work)], in arrival order, on one server doing `rate`
    work a second that always serves the job with the least work left."""
    waiting, departures, t = [], [], 0.0
    for arrival, work in sorted(jobs):
        while waiting and t + waiting[0] / rate <= arrival:
            t += heapq.heappop(waiting) / rate
            departures.append(t)
        if waiting:
            waiting[0] -= (arrival - t) * rate  # the least stays the least
        t = arrival
        heapq.heappush(waiting, work)
    while waiting:
        t += heapq.heappop(waiting) / rate
        departures.append(t)
    return departures


def area_of_max(arrivals, departures, alone_ends):
    """The integral over time of max(arrived - departed, arrived - past their alone time)."""
    events = sorted([(a, 1, 1) for a in arrivals] + [(d, -1, 0) for d in departures]
                    + [(e, 0, -1) for e in alone_ends])
    area, srpt, alone, last = 0.0, 0, 0, 0.0
    for t, d_srpt, d_alone in events:
        area += max(srpt, alone) * (t - last)
        srpt, alone, last = srpt + d_srpt, alone + d_alone, t
    return area


def slower_than(x, queues):
    """How many requests take at least `x` seconds under any routing (see queueing_bound)."""
    total = 0
    for arrivals, departures, jobs in queues:
        slow = sorted(a for a, _, alone_s in jobs if alone_s >= x)
        best = 0
        for a, _, alone_s in jobs:
            if alone_s >= x:
                continue
            t = a + x  # where the count can rise: a request leaves the window (t - x, t]
            unfinished = bisect.bisect_right(arrivals, t) - bisect.bisect_right(departures, t)
            window = bisect.bisect_right(arrivals, t) - bisect.bisect_right(arrivals, a)
            best = max(best, unfinished - window - bisect.bisect_right(slow, a))
        total += len(slow) + best
    return total

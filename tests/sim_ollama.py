"""A simulated Ollama node: a real HTTP server that takes the time a real machine would.

Where tests/fake_ollama.py answers at once, this one models what makes routing matter, with all
durations divided by `scale` so that runs stay short:

- memory: models are loaded into `memory_gb`; a model that does not fit evicts the least recently
  used idle models (waiting for busy ones to finish). A load takes the physics' fixed start-up
  plus the model's size over `load_gbs`. One load at a time per node, as in Ollama.
- CPU offload (`offload_gb` > 0): a model larger than `memory_gb` (the VRAM) loads only alone, as
  Ollama's scheduler does: it fills the VRAM and keeps the rest in `offload_gb` of system RAM,
  which streams at `cpu_gbs`. /api/ps shows, as Ollama's does, the memory it takes in all (weights
  and KV cache) as `size` and the part in VRAM as `size_vram`.
- context: a request whose num_ctx differs from the loaded one (or, with none, from the default)
  waits for the model's running requests, then reloads it. /v1 requests use the default. A model
  that cannot fit at the context asked for is refused with 500, as Ollama refuses it.
- slots: `num_parallel` requests per loaded model at once; the rest queue inside the node.
- speed (the `Physics`): decode tokens/s alone = bandwidth / model size; n streams of one model
  batch (each at n ^ -batch_exponent of alone); m models running at once each run at
  1 / (1 + side_by_side x (m - 1)) of alone (side_by_side 1: they split the bandwidth, 1/m);
  prefill = prefill_factor x decode speed per token; embeddings cost prefill only.
  Pacing: the default reads the speed when prefill starts and again every chunk of decode;
  `fluid` physics changes every stream's speed the moment another starts or ends, so a node never
  serves faster than the formulas allow (the generated benchmark's lower bound relies on it).
- /api/ps and /api/tags tell the truth; /sim/stats returns counters: loads (cold), reloads,
  evictions, reloads caused by a request whose num_ctx was at or below the loaded context,
  requests that started while another model was running, and prompt tokens (all, and found in a
  slot's cache). `records` holds, per inference request, where its time went at the node (see
  `Record`); `emptied` when each model was loaded, reloaded or evicted.
- gpu=False makes a CPU-only machine: /api/ps says size_vram 0, as Ollama does.
- prompt rate: `prefill_factor` (default: the physics') sets this node's own: prompt tokens go
  that many times faster than decode here (a GPU box evaluates prompts far faster, relative to its
  bandwidth, than an Apple chip or a CPU).
- prompt caches (`prompt_cache=True`), as Ollama's runner keeps them (runner/ollamarunner/cache.go):
  one input cache per parallel slot of a loaded model. A request takes the free slot whose cache
  shares the longest token prefix with its prompt (`findLongestCacheSlot`: the first such slot in
  slot order, a used one before an empty one, so a new conversation overwrites the lowest free
  slot that was used; with
  `multiuser_cache`, as OLLAMA_MULTIUSER_CACHE, `findBestCacheSlot`: see choose_slot) and
  evaluates only the rest, at least one token; the slot then holds the prompt plus the generated
  reply. A load, reload or eviction empties every slot of the model. Embeddings evaluate their whole
  input. A prompt is tokenised from its text, every 4 characters a token (see `prompt_text`), so
  prefixes compare by tokens; prompts are never truncated to the context (a slot holds any length).
  `prompt_eval_count` (and /v1 `usage.prompt_tokens`) count the tokens evaluated, not the cached
  ones, and `prompt_eval_duration` their time, as Ollama reports them. Without it every prompt is
  evaluated whole (the classic and generated benchmarks).
- replies: the text of a reply is drawn from its request (its prompt's text and length seeded, 4
  characters a token), so a client that sends a conversation's history back sends exactly what
  the node generated, and the same conversation has the same text behind every router.
- `first_token_alone=True` sends a stream's first token as soon as it is produced (Ollama sends it
  at the end of prefill) instead of with the first 40 ms chunk: time to first token is measured.

Final Ollama chunks carry load_duration, prompt_eval_duration and eval_duration (real time, ns),
prompt_eval_count and eval_count, as measured while the request ran under its physics; streamed
/v1 chunks go out as tokens are produced.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from fake_ollama import FakeHandler, QuietServer, full_name

GB = 1024 ** 3
DEFAULT_CTX = 4096
LOAD_FIXED_S = 1.0  # runner start-up before weights stream in
PREFILL_FACTOR = 20  # prefill processes this many times more tokens per second than decode
KV_SHARE_PER_4K = 0.08  # KV cache memory per 4k of context, as a share of the model's size
CHUNK_REAL_S = 0.04  # tokens produced within this much real time go out in one chunk
REQUEST_TAG = re.compile(r"#(\d+) ")  # a benchmark numbers its requests at the start of the prompt
CHARS_PER_TOKEN = 4  # how prompts and replies are tokenised: every 4 characters of text a token
# reply tokens: a consonant, a vowel, a consonant and a space (4 characters, so one token each)
REPLY_WORDS = [a + b + c + " " for a in "bcdfghklmnprstvz" for b in "aeiou" for c in "bdgklmnprst"]


@dataclass(frozen=True)
class Physics:
    """The formulas a simulated node follows. The defaults are the classic benchmark's."""

    side_by_side: float = 1.0  # m models at once: each at 1 / (1 + this x (m - 1)) of alone
    batch_exponent: float = 0.25  # n streams of one model: each at n ^ -this of alone
    load_fixed_s: float = LOAD_FIXED_S  # a load's start-up before the weights stream in
    prefill_factor: float = PREFILL_FACTOR
    fluid: bool = False  # speeds change the moment a stream starts or ends (else read per chunk)

    def describe(self):
        sharing = "1/m" if self.side_by_side == 1 else f"1/(1+{self.side_by_side:.2f}(m-1))"
        return (f"share {sharing}, batch n^-{self.batch_exponent:.2f}, load {self.load_fixed_s:.1f} s + GB/rate, "
                f"prefill {self.prefill_factor:.0f}x")


class ModelTooLarge(Exception):
    """The model cannot fit on this node at the context asked for, whatever it evicts."""


class Instance:
    """One loaded model on a node: `memory` GB in all, `vram` of it in fast memory."""

    def __init__(self, name, ctx, memory, vram=None):
        self.name, self.ctx, self.memory = name, ctx, memory
        self.vram = memory if vram is None else vram
        self.running = 0
        self.waiting = 0
        self.last_used = time.monotonic()
        self.reloading = False
        self.slots = []  # prompt caches (SlotCache), one per parallel slot, when the node keeps them

    @property
    def ram(self):
        return self.memory - self.vram


class SlotCache:
    """One parallel slot's input cache: the text whose tokens it holds, whether a request uses it,
    and when a request last took it (time.monotonic(); 0: never)."""

    def __init__(self):
        self.text = ""
        self.in_use = False
        self.used = 0.0


class Stream:
    """A request computing on a node under fluid physics: `work` decode-token equivalents (a prompt
    token counts 1 / prefill_factor), `done` so far, at `rate` per real second now."""

    def __init__(self, name, work):
        self.name, self.work = name, work
        self.done = 0.0
        self.rate = 0.0


@dataclass
class Record:
    """Where one request's time went at the node, in real seconds (the benchmark scales them)."""

    tag: int | None  # the benchmark's request number, from the prompt
    model: str
    arrived: float  # time.monotonic() the node received it
    slot_wait: float = 0.0  # waiting for a slot, for busy models before a load, for a drain before a reload
    load: float = 0.0  # a cold load
    reload: float = 0.0  # a reload at another context
    service: float = 0.0  # prefill and decode as they ran
    alone: float = 0.0  # prefill and decode alone on this node (service - alone: the sharing slowdown)
    ended: float = 0.0
    prompt_tokens: int = 0  # the prompt's tokens...
    cached_tokens: int = 0  # ...of which a slot's cache held these (prompt caches only)


class SimNode:
    def __init__(self, name, memory_gb, bandwidth_gbs, models, loaded=(), num_parallel=1, load_gbs=2.0,
                 scale=10.0, capabilities=None, port=0, gpu=True, default_ctx=DEFAULT_CTX, physics=Physics(),
                 offload_gb=0.0, cpu_gbs=60.0, prefill_factor=None, prompt_cache=False, multiuser_cache=False,
                 first_token_alone=False):
        self.name = name
        self.gpu = gpu  # False: a CPU-only machine, whose /api/ps says size_vram 0 as Ollama's does
        self.memory_gb = memory_gb
        self.offload_gb = offload_gb  # system RAM that takes what does not fit in memory_gb (VRAM)
        self.cpu_gbs = cpu_gbs  # how fast that RAM streams weights
        self.bandwidth = bandwidth_gbs
        self.models = {full_name(m): size for m, size in models.items()}  # name -> GB
        self.capabilities = {full_name(m): c for m, c in (capabilities or {}).items()}
        self.num_parallel = num_parallel
        self.default_ctx = default_ctx  # OLLAMA_CONTEXT_LENGTH: the context without num_ctx
        self.load_gbs = load_gbs
        self.scale = scale
        self.physics = physics
        self.prefill_factor = prefill_factor or physics.prefill_factor  # prompt tokens/s over decode tokens/s here
        self.prompt_cache = prompt_cache  # keep Ollama's per-slot prompt caches...
        self.multiuser_cache = multiuser_cache  # ...choosing slots as with OLLAMA_MULTIUSER_CACHE
        self.first_token_alone = first_token_alone
        self.port = port
        self.cond = threading.Condition()
        self.instances = {}
        self.streams = set()  # fluid physics: the requests computing now
        self.streams_marked = time.monotonic()  # when their progress was last brought up to date
        self.load_lock = threading.Lock()
        self.stats = {"loads": 0, "reloads": 0, "evictions": 0, "needless_reloads": 0, "requests": 0,
                      "side_by_side": 0, "prompt_tokens": 0, "cached_tokens": 0}
        self.records = []
        self.emptied = []  # (time.monotonic(), model, load | reload | eviction): its slots' caches emptied
        for model in loaded:
            name = full_name(model)
            self.instances[name] = Instance(name, default_ctx, self.footprint(name, default_ctx))
        self.server = None

    # -- the model of a machine ---------------------------------------------------------------

    def footprint(self, name, ctx):
        size = self.models[name]
        return size * (1 + KV_SHARE_PER_4K * ctx / DEFAULT_CTX)

    def placement(self, name, ctx):
        """(GB in VRAM, GB in system RAM) the model takes at `ctx`; raises ModelTooLarge."""
        need = self.footprint(name, ctx)
        if need <= self.memory_gb:
            return need, 0.0
        if need <= self.memory_gb + self.offload_gb:
            return self.memory_gb, need - self.memory_gb
        raise ModelTooLarge(f"model requires more system memory ({need:.1f} GiB) than is available "
                            f"({self.memory_gb + self.offload_gb:.1f} GiB)")

    def alone_tps(self, name):
        """Decode tokens/s of one stream of `name` alone here: weights over bandwidth, the part of
        an offloaded model in system RAM at CPU speed."""
        inst = self.instances.get(name)
        if inst is None or not inst.ram:
            return self.bandwidth / self.models[name]
        gpu_share = inst.vram / inst.memory
        return 1 / (self.models[name] * (gpu_share / self.bandwidth + (1 - gpu_share) / self.cpu_gbs))

    def decode_tps(self, name, running=None):
        """Tokens/s of one stream of `name` now, beside the `running` streams ({model: count};
        default: the slots taken). Streams of one model batch; different models contend."""
        if running is None:
            running = {i.name: i.running for i in list(self.instances.values()) if i.running}
        same = max(1, running.get(name, 1))
        models = max(1, len(running))
        physics = self.physics
        return self.alone_tps(name) * same ** -physics.batch_exponent / (1 + physics.side_by_side * (models - 1))

    def load_seconds(self, name):
        return self.physics.load_fixed_s + self.models[name] / self.load_gbs

    def sleep(self, sim_seconds):
        if sim_seconds > 0:
            time.sleep(sim_seconds / self.scale)

    def used(self):
        return sum(i.vram for i in self.instances.values()), sum(i.ram for i in self.instances.values())

    def acquire(self, name, ctx, asked_ctx, record):
        """Wait for a slot on `name` loaded with `ctx`, loading or reloading it as Ollama would,
        noting the time it took in `record`; raises ModelTooLarge."""
        need_vram, need_ram = self.placement(name, ctx)
        started = time.monotonic()
        with self.cond:
            while True:
                inst = self.instances.get(name)
                if inst is not None and inst.ctx == ctx and not inst.reloading:
                    if inst.running < self.num_parallel:
                        self.note_side_by_side(inst)
                        inst.running += 1
                        inst.last_used = time.monotonic()
                        record.slot_wait = time.monotonic() - started
                        return
                    inst.waiting += 1
                    self.cond.wait()
                    inst.waiting -= 1
                    continue
                if inst is not None and (inst.reloading or inst.running):
                    self.cond.wait()  # being loaded, or draining before a reload
                    continue
                idle = sorted((i for i in self.instances.values() if i is not inst and not i.running
                               and not i.waiting and not i.reloading), key=lambda i: i.last_used)
                used_vram, used_ram = self.used()
                mine = (inst.vram, inst.ram) if inst else (0.0, 0.0)
                busy_vram = used_vram - mine[0] - sum(i.vram for i in idle)
                busy_ram = used_ram - mine[1] - sum(i.ram for i in idle)
                if busy_vram + need_vram > self.memory_gb or busy_ram + need_ram > self.offload_gb:
                    self.cond.wait()  # only busy models stand in the way: wait for them
                    continue
                reload = inst is not None
                self.emptied.append((time.monotonic(), name, "reload" if reload else "load"))
                if reload:
                    self.stats["reloads"] += 1
                    if asked_ctx is not None and asked_ctx <= inst.ctx:
                        self.stats["needless_reloads"] += 1
                    del self.instances[name]
                else:
                    self.stats["loads"] += 1
                for victim in idle:  # least recently used first
                    used_vram, used_ram = self.used()
                    if used_vram + need_vram <= self.memory_gb and used_ram + need_ram <= self.offload_gb:
                        break
                    del self.instances[victim.name]
                    self.stats["evictions"] += 1
                    self.emptied.append((time.monotonic(), victim.name, "eviction"))
                placeholder = Instance(name, ctx, need_vram + need_ram, need_vram)
                placeholder.reloading = True
                self.instances[name] = placeholder
                break
        loading = time.monotonic()
        with self.load_lock:  # one load at a time per server
            self.sleep(self.load_seconds(name))
        with self.cond:
            placeholder.reloading = False
            self.note_side_by_side(placeholder)
            placeholder.running = 1
            placeholder.last_used = time.monotonic()
            self.cond.notify_all()
        record.slot_wait = loading - started
        if reload:
            record.reload = time.monotonic() - loading
        else:
            record.load = time.monotonic() - loading

    def note_side_by_side(self, inst):
        """Count requests that start while another model runs here (both then run slower)."""
        if any(other.running for other in self.instances.values() if other is not inst):
            self.stats["side_by_side"] += 1

    def release(self, name):
        with self.cond:
            inst = self.instances.get(name)
            if inst is not None:
                inst.running -= 1
                inst.last_used = time.monotonic()
            self.cond.notify_all()

    # -- prompt caches: one per parallel slot, as Ollama's runner keeps them ---------------------

    def take_slot(self, name, text):
        """A request holding a slot of `name` (acquire) starts on a slot's cache chosen as Ollama's
        runner chooses it (choose_slot); returns (that cache, tokens of the prompt it already holds)."""
        with self.cond:
            inst = self.instances[name]  # it holds a slot, so the model stays loaded
            if not inst.slots:
                inst.slots = [SlotCache() for _ in range(self.num_parallel)]
            cache, common = choose_slot(inst.slots, text, self.multiuser_cache)
            cached = min(common, prompt_tokens(text) - 1)  # the last token is evaluated again, to sample from
            cache.text = text[:cached * CHARS_PER_TOKEN]  # the rest of what it held is overwritten
            cache.in_use, cache.used = True, time.monotonic()
            return cache, cached

    def leave_slot(self, cache, text):
        """The request on `cache` is done: the slot holds `text` (its prompt and reply)."""
        with self.cond:
            cache.text, cache.in_use = text, False

    # -- fluid pacing: every stream's speed follows the streams running beside it -------------

    def mark_streams(self):
        """Bring every stream's progress up to now at the rates they had since the last mark."""
        now = time.monotonic()
        for stream in self.streams:
            stream.done += stream.rate * (now - self.streams_marked)
        self.streams_marked = now

    def rate_streams(self):
        running = {}
        for stream in self.streams:
            running[stream.name] = running.get(stream.name, 0) + 1
        for stream in self.streams:
            stream.rate = self.scale * self.decode_tps(stream.name, running)

    def begin_stream(self, name, work):
        stream = Stream(name, work)
        with self.cond:
            self.mark_streams()
            self.streams.add(stream)
            self.rate_streams()
            self.cond.notify_all()
        return stream

    def end_stream(self, stream):
        with self.cond:
            self.mark_streams()
            self.streams.discard(stream)
            self.rate_streams()
            self.cond.notify_all()

    def progress(self, stream, target, most=None):
        """Wait until `stream` has done `target` work, or `most` real seconds; returns work done."""
        deadline = None if most is None else time.monotonic() + most
        with self.cond:
            while True:
                self.mark_streams()
                left = target - stream.done
                now = time.monotonic()
                if left <= 1e-9 or (deadline is not None and now >= deadline):
                    return min(stream.done, stream.work)
                wait = left / stream.rate
                self.cond.wait(wait if deadline is None else min(wait, deadline - now))

    # -- server -------------------------------------------------------------------------------

    def start(self):
        handler = type("SimHandler", (SimHandler,), {"node": self})
        self.server = QuietServer(("127.0.0.1", self.port), handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 256
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


class ChunkPace:
    """The classic pacing: prefill at the speed it starts with, decode re-read every chunk."""

    def __init__(self, node, name, prompt_tokens, out_tokens):
        self.node, self.name, self.prompt_tokens, self.out_tokens = node, name, prompt_tokens, out_tokens

    def prefill(self):
        node = self.node
        node.sleep(self.prompt_tokens / (node.decode_tps(self.name) * node.prefill_factor))

    def decode(self):
        """Yield the tokens produced, a chunk's worth at a time (the first alone if the node says so)."""
        node, out_tokens = self.node, self.out_tokens
        produced = 0.0
        emitted = 0
        while emitted < out_tokens:
            rate = node.scale * node.decode_tps(self.name)  # tokens per real second
            tick = time.monotonic()
            first = node.first_token_alone and not emitted
            time.sleep(min(1 / rate if first else CHUNK_REAL_S, (out_tokens - produced) / rate))
            produced += (time.monotonic() - tick) * rate
            batch = min(out_tokens, int(produced)) - emitted
            if batch > 0:
                emitted += batch
                yield batch

    def close(self):
        pass


class FluidPace:
    """Fluid pacing: the request's work advances at whatever speed the node gives it moment by moment."""

    def __init__(self, node, name, prompt_tokens, out_tokens):
        self.node, self.out_tokens = node, out_tokens
        self.prefill_work = prompt_tokens / node.prefill_factor
        self.stream = node.begin_stream(name, self.prefill_work + out_tokens)
        self.closed = False

    def prefill(self):
        self.node.progress(self.stream, self.prefill_work)

    def decode(self):
        emitted = 0
        if self.node.first_token_alone and self.out_tokens:
            self.node.progress(self.stream, self.prefill_work + 1)
            emitted = 1
            yield 1
        while emitted < self.out_tokens:
            done = self.node.progress(self.stream, self.stream.work, CHUNK_REAL_S)
            finished = done >= self.stream.work - 1e-6
            batch = (self.out_tokens if finished else int(done - self.prefill_work)) - emitted
            if batch > 0:
                emitted += batch
                yield batch

    def close(self):
        if not self.closed:
            self.closed = True
            self.node.end_stream(self.stream)


def prompt_text(body):
    """The text a request's prompt is tokenised from: a generation's system and prompt, an
    embedding's inputs, a chat's message contents, in order (the template's markers left out)."""
    text = body.get("prompt") or body.get("input") or ""
    parts = [body.get("system") or "", text] if isinstance(text, str) else [body.get("system") or "", *text]
    parts += [message.get("content") or "" for message in body.get("messages") or ()]
    return "".join(parts)


def prompt_tokens(text):
    return max(1, len(text) // CHARS_PER_TOKEN)


def common_prefix_chars(a, b):
    """How many leading characters two texts share (compared in C, by halves)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def common_tokens(held, text):
    return common_prefix_chars(held, text) // CHARS_PER_TOKEN


def choose_slot(slots, text, multiuser=False):
    """The slot cache a prompt `text` starts on, and how many of its tokens it finds there
    (runner/ollamarunner/cache.go). findLongestCacheSlot (the default): the free slot sharing the
    longest prefix, the first in slot order among equals; a used slot shares at least the chat
    template's first tokens with any prompt (this simulator's prompts have no template), so an
    unrelated prompt takes the lowest free slot that was used before an empty one.
    findBestCacheSlot (OLLAMA_MULTIUSER_CACHE): the slot sharing the longest prefix when it is free
    and all it holds is that prefix; else the free slot used longest ago, into which the longest
    prefix, wherever it is, is copied first."""
    if not multiuser:
        best, rank = None, (-1, False)
        for cache in slots:
            if not cache.in_use:
                mine = (common_tokens(cache.text, text), bool(cache.text))
                if mine > rank:
                    best, rank = cache, mine
        return best, rank[0]
    best, longest, oldest = None, -1, None
    for cache in slots:
        common = common_tokens(cache.text, text)
        if common > longest:
            best, longest = cache, common
        if not cache.in_use and (oldest is None or cache.used < oldest.used):
            oldest = cache
    if longest == len(best.text) // CHARS_PER_TOKEN and not best.in_use:
        return best, longest
    if longest > 0 and best is not oldest:
        oldest.text = best.text[:longest * CHARS_PER_TOKEN]
    return oldest, longest


def cached_tokens(held, text):
    """Tokens of the prompt `text` that a slot holding `held` spares: their common prefix in
    whole tokens, leaving at least one to evaluate (Ollama's runner evaluates the last one again
    when the whole prompt is cached, to sample from it)."""
    return min(common_tokens(held, text), prompt_tokens(text) - 1)


def reply_tokens(text, count):
    """The `count` tokens a node generates for the prompt `text`: the same on every node."""
    rng = random.Random(hashlib.blake2b(f"{count}:{text}".encode(), digest_size=8).digest())
    return rng.choices(REPLY_WORDS, k=count)


def request_tag(body):
    """The benchmark's number for this request, when its prompt starts with one."""
    messages = body.get("messages") or ()
    text = messages[0].get("content") if messages else body.get("prompt") or body.get("input")
    match = REQUEST_TAG.match(text) if isinstance(text, str) else None
    return int(match.group(1)) if match else None


class SimHandler(FakeHandler):
    """The fake's HTTP plumbing (keep-alive, JSON, chunks) with the simulation's routes."""

    node: SimNode

    def tag(self, name):
        size = int(self.node.models[name] * GB)
        return {"name": name, "model": name, "size": size, "digest": "0" * 64,
                "modified_at": "2026-10-01T12:00:00Z",
                "details": {"format": "gguf", "family": name.split(":")[0], "parameter_size": "",
                            "quantization_level": "Q4_K_M"}}

    def do_GET(self):
        node = self.node
        if self.path == "/api/version":
            return self.send_json(200, {"version": "0.12.0"})
        if self.path == "/api/tags":
            return self.send_json(200, {"models": [self.tag(m) for m in node.models]})
        if self.path == "/api/ps":
            with node.cond:
                loaded = [dict(self.tag(i.name), size=int(i.memory * GB), size_vram=int(i.vram * GB) if node.gpu else 0,
                               context_length=i.ctx, expires_at="2099-01-01T00:00:00Z")
                          for i in node.instances.values() if not i.reloading]
            return self.send_json(200, {"models": loaded})
        if self.path == "/sim/stats":
            return self.send_json(200, dict(node.stats))
        self.send_json(404, {"error": "not found"})

    def do_POST(self):
        node = self.node
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        name = full_name(str(body.get("model", "")))
        if self.path == "/api/show":
            if name not in node.models:
                return self.send_json(404, {"error": f"model '{name}' not found"})
            caps = node.capabilities.get(name) or (["embedding"] if "embed" in name else ["completion", "tools"])
            return self.send_json(200, {"capabilities": caps, "model_info": {}, "details": self.tag(name)["details"]})
        if name not in node.models:
            return self.send_json(404, {"error": f"model '{name}' not found"})
        openai = self.path.startswith("/v1/")
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        asked_ctx = None if openai else options.get("num_ctx")
        ctx = asked_ctx or node.default_ctx
        text = prompt_text(body)
        tokens = prompt_tokens(text)
        out_tokens = int(body.get("max_tokens") or options.get("num_predict") or 100)
        node.stats["requests"] += 1
        record = Record(request_tag(body), name, time.monotonic())
        try:
            node.acquire(name, ctx, asked_ctx, record)
        except ModelTooLarge as exc:
            return self.send_json(500, {"error": str(exc)})
        load_real = record.load + record.reload
        if self.path == "/api/generate" and not body.get("prompt") and not body.get("messages"):
            node.release(name)  # Ollama: no prompt means load the model and return
            return self.send_json(200, {"model": name, "done": True, "done_reason": "load", "response": ""})
        embedding = "embed" in self.path
        if embedding:
            out_tokens = 0
        cache, cached = (node.take_slot(name, text) if node.prompt_cache and not embedding else (None, 0))
        evaluated = tokens - cached  # what the node evaluates, and reports as prompt_eval_count
        record.prompt_tokens, record.cached_tokens = tokens, cached
        node.stats["prompt_tokens"] += tokens
        node.stats["cached_tokens"] += cached
        reply = reply_tokens(text, out_tokens)
        alone = node.alone_tps(name) * node.scale
        record.alone = (evaluated / node.prefill_factor + out_tokens) / alone
        pace = (FluidPace if node.physics.fluid else ChunkPace)(node, name, evaluated, out_tokens)
        try:
            started = time.monotonic()
            pace.prefill()
            prefill_real = time.monotonic() - started
            if embedding:
                pace.close()
                record.service = prefill_real
                return self.embed(name, body, evaluated, load_real, prefill_real)
            stream = body.get("stream", not openai)
            self.generate(name, body, openai, bool(stream), pace, evaluated, reply, load_real, prefill_real, record)
        finally:
            pace.close()
            if cache is not None:
                node.leave_slot(cache, text + "".join(reply))
            node.release(name)
            record.ended = time.monotonic()
            node.records.append(record)

    def embed(self, name, body, prompt_tokens, load_real, prefill_real):
        vector = [0.1] * 8
        if self.path == "/v1/embeddings":
            return self.send_json(200, {"object": "list", "model": name, "data": [{"object": "embedding", "index": 0,
                                        "embedding": vector}], "usage": {"prompt_tokens": prompt_tokens,
                                                                          "total_tokens": prompt_tokens}})
        self.send_json(200, {"model": name, "embeddings": [vector], "prompt_eval_count": prompt_tokens,
                             "load_duration": int(load_real * 1e9), "total_duration": int((load_real + prefill_real) * 1e9),
                             "prompt_eval_duration": int(prefill_real * 1e9)})

    def generate(self, name, body, openai, stream, pace, prompt_tokens, reply, load_real, prefill_real, record):
        chat = "chat" in self.path
        out_tokens = len(reply)
        emitted = 0
        if stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream" if openai else "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
        decode_started = time.monotonic()
        for batch in pace.decode():
            if stream:
                text = "".join(reply[emitted:emitted + batch])
                emitted += batch
                if openai:
                    delta = {"content": text} if chat else None
                    choice = {"index": 0, "delta": delta, "finish_reason": None} if chat else {"index": 0, "text": text}
                    self.chunk(b"data: " + json.dumps({"object": "chat.completion.chunk", "model": name,
                                                       "choices": [choice]}).encode() + b"\n\n")
                else:
                    part = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
                    self.chunk(json.dumps(dict(part, model=name, done=False)).encode() + b"\n")
        eval_real = time.monotonic() - decode_started
        pace.close()
        record.service = prefill_real + eval_real
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": out_tokens,
                 "total_tokens": prompt_tokens + out_tokens}
        final = {"model": name, "done": True, "done_reason": "stop", "prompt_eval_count": prompt_tokens,
                 "eval_count": out_tokens, "load_duration": int(load_real * 1e9),
                 "prompt_eval_duration": int(prefill_real * 1e9), "eval_duration": int(eval_real * 1e9),
                 "total_duration": int((load_real + prefill_real + eval_real) * 1e9),
                 "created_at": datetime.now(timezone.utc).isoformat()}
        if stream:
            if openai:
                self.chunk(b"data: " + json.dumps({"object": "chat.completion.chunk", "model": name, "choices": [
                    {"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}).encode() + b"\n\n")
                self.chunk(b"data: [DONE]\n\n")
            else:
                final.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
                self.chunk(json.dumps(final).encode() + b"\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        elif openai:
            message = {"role": "assistant", "content": "".join(reply)}
            self.send_json(200, {"object": "chat.completion", "model": name, "usage": usage,
                                 "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
        else:
            final.update({"message": {"role": "assistant", "content": "".join(reply)}} if chat
                         else {"response": "".join(reply)})
            self.send_json(200, final)

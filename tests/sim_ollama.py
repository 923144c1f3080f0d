"""A simulated Ollama node: a real HTTP server that takes the time a real machine would.

Where tests/fake_ollama.py answers at once, this one models what makes routing matter, with all
durations divided by `scale` so that runs stay short:

- memory: models are loaded into `memory_gb`; a model that does not fit evicts the least recently
  used idle models (waiting for busy ones to finish). A load takes `LOAD_FIXED_S` plus the model's
  size over `load_gbs`. One load at a time per node, as in Ollama.
- context: a request whose num_ctx differs from the loaded one (or, with none, from the default)
  waits for the model's running requests, then reloads it. /v1 requests use the default.
- slots: `num_parallel` requests per loaded model at once; the rest queue inside the node.
- speed: decode tokens/s = bandwidth / model size; n streams of one model batch (each at n^-0.25
  of alone), m models running at once share the bandwidth (each at 1/m); prefill = 20x decode
  speed per token; embeddings cost prefill only.
- /api/ps and /api/tags tell the truth; /sim/stats returns counters: loads (cold), reloads,
  evictions, reloads caused by a request whose num_ctx was at or below the loaded context, and
  requests that started while another model was running.
- gpu=False makes a CPU-only machine: /api/ps says size_vram 0, as Ollama does.

Final Ollama chunks carry load_duration, prompt_eval_duration and eval_duration (real time, ns).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

from fake_ollama import FakeHandler, QuietServer, full_name

GB = 1024 ** 3
DEFAULT_CTX = 4096
LOAD_FIXED_S = 1.0  # runner start-up before weights stream in
PREFILL_FACTOR = 20  # prefill processes this many times more tokens per second than decode
KV_SHARE_PER_4K = 0.08  # KV cache memory per 4k of context, as a share of the model's size
CHUNK_REAL_S = 0.04  # tokens produced within this much real time go out in one chunk


class Instance:
    """One loaded model on a node."""

    def __init__(self, name, ctx, memory):
        self.name, self.ctx, self.memory = name, ctx, memory
        self.running = 0
        self.waiting = 0
        self.last_used = time.monotonic()
        self.reloading = False


class SimNode:
    def __init__(self, name, memory_gb, bandwidth_gbs, models, loaded=(), num_parallel=1, load_gbs=2.0,
                 scale=10.0, capabilities=None, port=0, gpu=True, default_ctx=DEFAULT_CTX):
        self.name = name
        self.gpu = gpu  # False: a CPU-only machine, whose /api/ps says size_vram 0 as Ollama's does
        self.memory_gb = memory_gb
        self.bandwidth = bandwidth_gbs
        self.models = {full_name(m): size for m, size in models.items()}  # name -> GB
        self.capabilities = {full_name(m): c for m, c in (capabilities or {}).items()}
        self.num_parallel = num_parallel
        self.default_ctx = default_ctx  # OLLAMA_CONTEXT_LENGTH: the context without num_ctx
        self.load_gbs = load_gbs
        self.scale = scale
        self.port = port
        self.cond = threading.Condition()
        self.instances = {}
        self.load_lock = threading.Lock()
        self.stats = {"loads": 0, "reloads": 0, "evictions": 0, "needless_reloads": 0, "requests": 0,
                      "side_by_side": 0}
        for model in loaded:
            name = full_name(model)
            self.instances[name] = Instance(name, default_ctx, self.footprint(name, default_ctx))
        self.server = None

    # -- the model of a machine ---------------------------------------------------------------

    def footprint(self, name, ctx):
        size = self.models[name]
        return size * (1 + KV_SHARE_PER_4K * ctx / DEFAULT_CTX)

    def decode_tps(self, name):
        """Tokens/s of one stream of `name` now. Streams of one model batch (each runs at
        n ^ -0.25 of alone); different models take turns at the memory bandwidth."""
        running = {i.name: i.running for i in list(self.instances.values()) if i.running}
        same = max(1, running.get(name, 1))
        return self.bandwidth / self.models[name] * same ** -0.25 / max(1, len(running))

    def load_seconds(self, name):
        return LOAD_FIXED_S + self.models[name] / self.load_gbs

    def sleep(self, sim_seconds):
        if sim_seconds > 0:
            time.sleep(sim_seconds / self.scale)

    def used(self):
        return sum(i.memory for i in self.instances.values())

    def acquire(self, name, ctx, asked_ctx):
        """Wait for a slot on `name` loaded with `ctx`, loading or reloading it as Ollama would.
        Returns the real seconds spent loading (0 when it was hot)."""
        with self.cond:
            while True:
                inst = self.instances.get(name)
                if inst is not None and inst.ctx == ctx and not inst.reloading:
                    if inst.running < self.num_parallel:
                        self.note_side_by_side(inst)
                        inst.running += 1
                        inst.last_used = time.monotonic()
                        return 0.0
                    inst.waiting += 1
                    self.cond.wait()
                    inst.waiting -= 1
                    continue
                if inst is not None and (inst.reloading or inst.running):
                    self.cond.wait()  # being loaded, or draining before a reload
                    continue
                need = self.footprint(name, ctx)
                idle = sorted((i for i in self.instances.values() if i is not inst and not i.running
                               and not i.waiting and not i.reloading), key=lambda i: i.last_used)
                busy = self.used() - (inst.memory if inst else 0) - sum(i.memory for i in idle)
                if busy + need > self.memory_gb:
                    self.cond.wait()  # only busy models stand in the way: wait for them
                    continue
                if inst is not None:
                    self.stats["reloads"] += 1
                    if asked_ctx is not None and asked_ctx <= inst.ctx:
                        self.stats["needless_reloads"] += 1
                    del self.instances[name]
                else:
                    self.stats["loads"] += 1
                for victim in idle:  # least recently used first
                    if self.used() + need <= self.memory_gb:
                        break
                    del self.instances[victim.name]
                    self.stats["evictions"] += 1
                placeholder = Instance(name, ctx, need)
                placeholder.reloading = True
                self.instances[name] = placeholder
                break
        started = time.monotonic()
        with self.load_lock:  # one load at a time per server
            self.sleep(self.load_seconds(name))
        with self.cond:
            placeholder.reloading = False
            self.note_side_by_side(placeholder)
            placeholder.running = 1
            placeholder.last_used = time.monotonic()
            self.cond.notify_all()
        return time.monotonic() - started

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


def prompt_chars(body):
    text = body.get("prompt") or body.get("input") or ""
    total = len(text) if isinstance(text, str) else sum(len(t) for t in text)
    for message in body.get("messages") or ():
        total += len(message.get("content") or "")
    return total


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
                loaded = [dict(self.tag(i.name), size_vram=int(i.memory * GB) if node.gpu else 0, context_length=i.ctx,
                               expires_at="2099-01-01T00:00:00Z")
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
        prompt_tokens = max(1, prompt_chars(body) // 4)
        out_tokens = int(body.get("max_tokens") or options.get("num_predict") or 100)
        node.stats["requests"] += 1
        load_real = node.acquire(name, ctx, asked_ctx)
        if self.path == "/api/generate" and not body.get("prompt") and not body.get("messages"):
            node.release(name)  # Ollama: no prompt means load the model and return
            return self.send_json(200, {"model": name, "done": True, "done_reason": "load", "response": ""})
        try:
            started = time.monotonic()
            node.sleep(prompt_tokens / (node.decode_tps(name) * PREFILL_FACTOR))
            prefill_real = time.monotonic() - started
            if "embed" in self.path:
                return self.embed(name, body, prompt_tokens, load_real, prefill_real)
            stream = body.get("stream", not openai)
            self.generate(name, body, openai, bool(stream), prompt_tokens, out_tokens, load_real, prefill_real)
        finally:
            node.release(name)

    def embed(self, name, body, prompt_tokens, load_real, prefill_real):
        vector = [0.1] * 8
        if self.path == "/v1/embeddings":
            return self.send_json(200, {"object": "list", "model": name, "data": [{"object": "embedding", "index": 0,
                                        "embedding": vector}], "usage": {"prompt_tokens": prompt_tokens,
                                                                          "total_tokens": prompt_tokens}})
        self.send_json(200, {"model": name, "embeddings": [vector], "prompt_eval_count": prompt_tokens,
                             "load_duration": int(load_real * 1e9), "total_duration": int((load_real + prefill_real) * 1e9),
                             "prompt_eval_duration": int(prefill_real * 1e9)})

    def generate(self, name, body, openai, stream, prompt_tokens, out_tokens, load_real, prefill_real):
        node = self.node
        chat = "chat" in self.path
        if stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream" if openai else "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
        produced = 0.0
        emitted = 0
        decode_started = time.monotonic()
        while emitted < out_tokens:
            rate = node.scale * node.decode_tps(name)  # tokens per real second
            tick = time.monotonic()
            time.sleep(min(CHUNK_REAL_S, (out_tokens - produced) / rate))
            produced += (time.monotonic() - tick) * rate
            batch = min(out_tokens, int(produced)) - emitted
            if batch <= 0:
                continue
            emitted += batch
            if stream:
                text = "x " * batch
                if openai:
                    delta = {"content": text} if chat else None
                    choice = {"index": 0, "delta": delta, "finish_reason": None} if chat else {"index": 0, "text": text}
                    self.chunk(b"data: " + json.dumps({"object": "chat.completion.chunk", "model": name,
                                                       "choices": [choice]}).encode() + b"\n\n")
                else:
                    part = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
                    self.chunk(json.dumps(dict(part, model=name, done=False)).encode() + b"\n")
        eval_real = time.monotonic() - decode_started
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
            message = {"role": "assistant", "content": "x " * out_tokens}
            self.send_json(200, {"object": "chat.completion", "model": name, "usage": usage,
                                 "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
        else:
            final.update({"message": {"role": "assistant", "content": "x " * out_tokens}} if chat
                         else {"response": "x " * out_tokens})
            self.send_json(200, final)

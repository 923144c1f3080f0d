"""A fake Ollama: a real HTTP server that answers like Ollama where herd touches it.

Tests and benchmarks start several on loopback ports to make a fleet. It serves /api/version,
/api/tags, /api/ps, /api/show, /api/chat, /api/generate, /api/embed, /api/embeddings, /api/pull,
/api/delete and the /v1 endpoints, streaming or not, and misbehaves on demand:

    fake = FakeOllama(models={"llama3.2:latest": 2.0}, loaded=["llama3.2:latest"]).start()
    fake.fail_next(2, status=500)      # the next two inference requests answer 500
    fake.first_byte_delay = 5          # wait before answering (a model load)
    fake.die_after_chunks = 3          # drop the connection mid-stream
    fake.stall_after_chunks = (2, 30)  # go silent for 30 s after two chunks
    fake.drop_prompts = {"POISON"}      # close the connection unanswered on this prompt (a crashed runner)
    fake.gzip_replies = True           # non-streamed replies gzipped (a compressing proxy in front)
    fake.redirect_to = "http://x/"     # inference answered with a 307 there (a proxy in front)
    fake.extra_headers = {"Trailers": "x"}  # sent with every answer (a proxy in front adds its own)
    fake.stop()                        # connection refused from now on

Run alone:  python tests/fake_ollama.py --port 11501 --models llama3.2,qwen2.5:7b --loaded llama3.2
"""

from __future__ import annotations

import argparse
import gzip
import json
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GB = 1024 ** 3
INFERENCE = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/v1/chat/completions",
             "/v1/completions", "/v1/embeddings")
EMBEDDING_DIM = 8


def full_name(name):
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


class FakeOllama:
    """One fake Ollama server. Attributes may be changed while it runs."""

    def __init__(self, models=None, loaded=(), host="127.0.0.1", port=0, tokens=5, token_delay=0.0,
                 context_length=4096, version="0.12.0", capabilities=None):
        # models: name -> size in GB
        self.models = {full_name(k): v for k, v in (models or {"llama3.2:latest": 2.0}).items()}
        self.loaded = {full_name(m): context_length for m in loaded}  # name -> context length
        self.capabilities = {full_name(k): v for k, v in (capabilities or {}).items()}
        self.host, self.port = host, port
        self.tokens = tokens
        self.token_delay = token_delay
        self.context_length = context_length
        self.version = version
        self.first_byte_delay = 0.0
        self.die_after_chunks = None
        self.stall_after_chunks = None  # (chunks, seconds): go silent mid-stream
        self.drop_prompts = set()  # a request whose prompt or last message is one of these gets no answer
        self.pull_steps = 3
        self.unpullable = set()  # names the registry does not have: their pull ends with an error
        self.gzip_replies = False  # answer inference requests gzipped, as a compressing proxy in front would
        self.redirect_to = None  # answer inference requests with a 307 there, as a proxy in front might
        self.extra_headers = {}  # headers sent with every answer, as a proxy in front might add
        self.eval_duration_ns = 900  # what replies say generation took (herd learns speed from it)
        self.load_duration_ns = 10  # what replies say loading took (above 50 ms herd counts a cold load)
        self.gpu = True  # False: /api/ps says size_vram 0, as Ollama does for a model in system RAM
        self.reports_context = True  # False: /api/ps has no context_length, as older Ollama
        self._failures = []  # statuses for the next inference requests
        self.lock = threading.Lock()
        self.active = {}  # model -> requests running now
        self.max_active = {}  # model -> most requests seen running at once
        self.served = 0
        self.reloads = 0  # a model loaded again at another context
        self.received = []  # (path, body) of every inference request
        self.server = None

    # -- control ----------------------------------------------------------------------------

    def start(self):
        handler = type("Handler", (FakeHandler,), {"fake": self})
        self.server = QuietServer((self.host, self.port), handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 1024
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def fail_next(self, count, status=500):
        with self.lock:
            self._failures.extend([status] * count)

    def take_failure(self):
        with self.lock:
            return self._failures.pop(0) if self._failures else None

    # -- what Ollama would say ----------------------------------------------------------------

    def tag_entry(self, name):
        family = name.split(":")[0].split("/")[-1]
        return {"name": name, "model": name, "modified_at": "2026-10-01T12:00:00.000000+00:00",
                "size": int(self.models[name] * GB), "digest": f"sha256:{abs(hash(name)):064x}"[:71],
                "details": {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                            "parameter_size": "3B", "quantization_level": "Q4_K_M"}}

    def ps_entry(self, name):
        entry = self.tag_entry(name)
        entry.update(expires_at="2099-01-01T00:00:00Z", size_vram=entry["size"] if self.gpu else 0)
        if self.reports_context:
            entry["context_length"] = self.loaded[name]
        return entry

    def begin(self, model, num_ctx=None):
        """A request starts: like Ollama, it loads the model at its num_ctx (else the default
        context), reloading it when it runs with another one (counted in `reloads`)."""
        with self.lock:
            self.active[model] = self.active.get(model, 0) + 1
            self.max_active[model] = max(self.max_active.get(model, 0), self.active[model])
            wanted = int(num_ctx) if num_ctx else self.context_length
            if model in self.loaded and self.loaded[model] != wanted:
                self.reloads += 1
            self.loaded[model] = wanted

    def end(self, model):
        with self.lock:
            self.active[model] -= 1
            self.served += 1
            self.loaded.setdefault(model, self.context_length)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients that hang up (tests of disconnects) are expected, not news


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeOllama

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle and delayed ACKs add 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    # -- plumbing ---------------------------------------------------------------------------

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_extra_headers()
        if getattr(getattr(self, "fake", None), "gzip_replies", False) and self.path in INFERENCE:  # (not the simulator's)
            data = gzip.compress(data)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self, content_type):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_extra_headers()
        self.end_headers()

    def send_extra_headers(self):
        for name, value in getattr(getattr(self, "fake", None), "extra_headers", {}).items():
            self.send_header(name, value)

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunks(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:  # UTF-8 only, no BOM, as Ollama (Go's encoding/json) reads it
            return json.loads(raw.decode("utf-8")) if raw else {}
        except ValueError:
            return None

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self):
        fake = self.fake
        if self.path == "/":
            data = b"Ollama is running"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/api/version":
            self.send_json(200, {"version": fake.version})
        elif self.path == "/api/tags":
            self.send_json(200, {"models": [fake.tag_entry(m) for m in list(fake.models)]})
        elif self.path == "/api/ps":
            self.send_json(200, {"models": [fake.ps_entry(m) for m in list(fake.loaded) if m in fake.models]})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "library"} for m in fake.models]})
        else:
            self.send_json(404, {"error": "not found"})

    def do_DELETE(self):
        body = self.read_body() or {}
        name = full_name(body.get("model") or body.get("name") or "")
        if name in self.fake.models:
            self.fake.models.pop(name)
            self.fake.loaded.pop(name, None)
            self.send_json(200, {})
        else:
            self.send_json(404, {"error": f"model '{name}' not found"})

    def do_POST(self):
        fake = self.fake
        body = self.read_body()
        if body is None:
            return self.send_json(400, {"error": "invalid character in JSON"})
        if self.path == "/_fake/control":  # for benchmarks that run the fake in another process
            if "fail" in body:
                fake.fail_next(int(body["fail"]["count"]), int(body["fail"]["status"]))
            for key in ("token_delay", "first_byte_delay", "die_after_chunks"):
                if key in body:
                    setattr(fake, key, body[key])
            return self.send_json(200, {"ok": True})
        if self.path == "/api/show":
            return self.show(body)
        if self.path == "/api/pull":
            return self.pull(body)
        if self.path not in INFERENCE:
            return self.send_json(404, {"error": "not found"})
        openai = self.path.startswith("/v1/")
        model = full_name(str(body.get("model", "")))
        with fake.lock:
            fake.received.append((self.path, body))
        status = fake.take_failure()
        if fake.redirect_to:
            self.send_response(307)
            self.send_header("Location", fake.redirect_to)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        if {str(body.get("prompt")), str(last.get("content"))} & fake.drop_prompts:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # no status line: the node just hangs up
            return
        if fake.first_byte_delay:
            time.sleep(fake.first_byte_delay)
        if status:
            return self.send_json(status, {"error": f"fake failure {status}"})
        if model not in fake.models:
            if openai:
                return self.send_json(404, {"error": {"message": f"model \"{model}\" not found, try pulling it first",
                                                      "type": "api_error", "param": None, "code": None}})
            return self.send_json(404, {"error": f"model '{model}' not found"})
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        fake.begin(model, None if openai else options.get("num_ctx"))
        try:
            if "embed" in self.path:
                self.embed(model, body)
            elif openai:
                self.openai_completion(model, body)
            else:
                self.ollama_completion(model, body)
        finally:
            fake.end(model)

    def show(self, body):
        name = full_name(str(body.get("model") or body.get("name") or ""))
        if name not in self.fake.models:
            return self.send_json(404, {"error": f"model '{name}' not found"})
        caps = self.fake.capabilities.get(name) or (["embedding"] if "embed" in name else ["completion", "tools"])
        self.send_json(200, {"modelfile": "", "parameters": "", "template": "{{ .Prompt }}",
                             "details": self.fake.tag_entry(name)["details"],
                             "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
                             "capabilities": caps, "modified_at": "2026-10-01T12:00:00.000000+00:00"})

    def pull(self, body):
        fake = self.fake
        name = full_name(str(body.get("model") or body.get("name") or ""))
        self.start_chunked("application/x-ndjson")
        self.chunk(b'{"status":"pulling manifest"}\n')
        if name in fake.unpullable:
            self.chunk(b'{"error":"pull model manifest: file does not exist"}\n')
            return self.end_chunks()
        for step in range(fake.pull_steps):
            time.sleep(fake.token_delay)
            self.chunk(json.dumps({"status": "pulling layer", "digest": "sha256:00", "total": 100,
                                   "completed": (step + 1) * 100 // fake.pull_steps}).encode() + b"\n")
        fake.models.setdefault(name, 1.0)
        self.chunk(b'{"status":"success"}\n')
        self.end_chunks()

    # -- inference --------------------------------------------------------------------------

    def pieces(self):
        """Yield token texts, sleeping token_delay between them, dying on demand."""
        fake = self.fake
        for index in range(fake.tokens):
            if fake.die_after_chunks is not None and index >= fake.die_after_chunks:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                raise ConnectionAbortedError("fake died mid-stream")
            if fake.stall_after_chunks and index == fake.stall_after_chunks[0]:
                time.sleep(fake.stall_after_chunks[1])
            if index and fake.token_delay:
                time.sleep(fake.token_delay)
            yield f"tok{index} "

    def ollama_completion(self, model, body):
        fake = self.fake
        chat = self.path == "/api/chat"
        now = datetime.now(timezone.utc).isoformat()
        final = {"model": model, "created_at": now, "done": True, "done_reason": "stop",
                 "total_duration": 1000, "load_duration": fake.load_duration_ns, "prompt_eval_count": 7,
                 "prompt_eval_duration": 100, "eval_count": fake.tokens, "eval_duration": fake.eval_duration_ns}
        if body.get("stream", True) is False:
            text = "".join(self.pieces())
            reply = {"model": model, "created_at": now}
            reply.update({"message": {"role": "assistant", "content": text}} if chat else {"response": text})
            reply.update(final)
            return self.send_json(200, reply)
        self.start_chunked("application/x-ndjson")
        try:
            for piece in self.pieces():
                part = {"model": model, "created_at": now, "done": False}
                part.update({"message": {"role": "assistant", "content": piece}} if chat else {"response": piece})
                self.chunk(json.dumps(part).encode() + b"\n")
        except ConnectionAbortedError:
            return
        final.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        self.chunk(json.dumps(final).encode() + b"\n")
        self.end_chunks()

    def openai_completion(self, model, body):
        fake = self.fake
        chat = self.path == "/v1/chat/completions"
        kind = "chat.completion" if chat else "text_completion"
        usage = {"prompt_tokens": 7, "completion_tokens": fake.tokens, "total_tokens": 7 + fake.tokens}
        base = {"id": "chatcmpl-1", "created": int(time.time()), "model": model, "system_fingerprint": "fp_ollama"}
        if not body.get("stream"):
            text = "".join(self.pieces())
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                      if chat else {"index": 0, "text": text, "finish_reason": "stop"})
            return self.send_json(200, dict(base, object=kind, choices=[choice], usage=usage))
        self.start_chunked("text/event-stream")
        try:
            for piece in self.pieces():
                choice = ({"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": None}
                          if chat else {"index": 0, "text": piece, "finish_reason": None})
                self.chunk(b"data: " + json.dumps(dict(base, object=kind + ".chunk" if chat else kind,
                                                       choices=[choice])).encode() + b"\n\n")
        except ConnectionAbortedError:
            return
        last = ({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}
                if chat else {"index": 0, "text": "", "finish_reason": "stop"})
        self.chunk(b"data: " + json.dumps(dict(base, object=kind + ".chunk" if chat else kind,
                                               choices=[last])).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            self.chunk(b"data: " + json.dumps(dict(base, object=kind + ".chunk", choices=[],
                                                   usage=usage)).encode() + b"\n\n")
        self.chunk(b"data: [DONE]\n\n")
        self.end_chunks()

    def embed(self, model, body):
        inputs = body.get("input", body.get("prompt", ""))
        inputs = inputs if isinstance(inputs, list) else [inputs]
        vectors = [[round(0.1 * (i + 1) + 0.01 * d, 4) for d in range(EMBEDDING_DIM)] for i in range(len(inputs))]
        if self.path == "/api/embeddings":
            return self.send_json(200, {"embedding": vectors[0]})
        if self.path == "/api/embed":
            return self.send_json(200, {"model": model, "embeddings": vectors, "total_duration": 100,
                                        "load_duration": 1, "prompt_eval_count": 3 * len(inputs)})
        self.send_json(200, {"object": "list", "model": model,
                             "data": [{"object": "embedding", "index": i, "embedding": v}
                                      for i, v in enumerate(vectors)],
                             "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)}})


def main():
    parser = argparse.ArgumentParser(description="Run a fake Ollama for trying herd without GPUs.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--models", default="llama3.2,nomic-embed-text", help="comma separated; name or name=GB")
    parser.add_argument("--loaded", default="", help="comma separated models loaded at start")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-delay", type=float, default=0.05, help="seconds between tokens")
    args = parser.parse_args()
    models = {}
    for spec in filter(None, args.models.split(",")):
        name, _, size = spec.partition("=")
        models[name] = float(size or 2.0)
    fake = FakeOllama(models=models, loaded=[m for m in args.loaded.split(",") if m], host=args.host,
                      port=args.port, tokens=args.tokens, token_delay=args.token_delay).start()
    print(f"fake Ollama on {fake.url} with {', '.join(fake.models)}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()

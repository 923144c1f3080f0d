"""herd: one Ollama and OpenAI endpoint for a home lab's fleet of Ollama machines.

Clients talk to herd on port 11435 exactly as they would talk to Ollama (``/api/chat``,
``/api/generate``, ``/api/embed``, ...) or to OpenAI (``/v1/chat/completions``, ...). For every
request herd picks the node that will finish it soonest: the model hot in memory, headroom, a
short queue, a good speed record. It never sends a node more concurrent requests for a model than
the node runs in parallel; the rest wait here, oldest first. A node that fails before the first
byte is retried on the next-best one. Every decision is written to SQLite.

Run it:      python herd.py --node http://gpu-box:11434 --node mac=http://mac-studio:11434
             (or run ``herd-node`` beside each Ollama and let it find the router over mDNS)
Data:        ~/.fleet-manager (``--data-dir`` / FLEET_DATA_DIR): latency.db (traces, settings),
             logs/herd.jsonl (one JSON object a line).

Sections, in the order a request meets them:
    settings -> helpers (names, errors, Ollama's replies) -> the door (every body read once and
    checked) -> nodes -> context rules -> scoring (with learning) -> warming (calibration,
    preloads) -> the fleet (one object, one lock, the admission queue) -> node polling and
    discovery -> VRAM fallback -> auto-pull -> watchdog -> proxying (one Exchange per request,
    from the door to its trace row) -> analytics (rollups) -> trace store -> dashboard API (and
    /metrics, benchmarks) -> Herd (one router) -> HTTP routes -> server -> command line
"""

from __future__ import annotations

import _thread
import bisect
import collections
import contextlib
import hmac
import itertools
import json
import logging
import logging.handlers
import math
import os
import queue
import random
import re
import signal
import socket
import sqlite3
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, urlsplit

import click
import requests
import urllib3
import waitress
import waitress.channel
import waitress.task
import waitress.wasyncore
from flask import Flask, Response, request, send_from_directory

__version__ = "0.1.0"

log = logging.getLogger("herd")


# =============================================================================================
# Settings
# =============================================================================================

DEFAULT_DATA_DIR = Path.home() / ".fleet-manager"
LOCAL_OLLAMA = "http://localhost:11434"
CONTEXT_POLICIES = ("strip", "warn", "passthrough")

# Settings a user may change at run time (dashboard API); persisted in the `settings` table.
RUNTIME_SETTINGS = {"auto_pull": True, "vram_fallback": True, "context_protection": "strip", "preload": True,
                    "calibrate": True, "prompt_affinity": True}


@dataclass
class Config:
    """Everything the router needs to start; built by the CLI (whose defaults are these) or
    directly by tests."""

    host: str = "0.0.0.0"
    port: int = 11435
    data_dir: Path = DEFAULT_DATA_DIR
    nodes: list = field(default_factory=list)  # [(name, url)] polled by the router itself
    # Waitress gives each request (stream included) one thread for its whole life: room for
    # hundreds of concurrent streams plus the admission queue.
    threads: int = 768
    api_key: str | None = None
    parallel: int = 1  # slots per model on nodes that do not report num_parallel (Ollama's default)
    mdns: bool = True
    local: bool = True  # serve http://localhost:11434 as node `local` when nothing else is set up
    log_level: str = "INFO"
    poll_interval: float = 5.0  # seconds between polls of agentless nodes
    queue_timeout: float = 300.0  # longest wait in the admission queue
    max_queue: int = 1000  # requests waiting in the admission queue at once
    stall_timeout: float = 600.0  # a request silent this long is reaped
    connect_timeout: float = 3.0  # TCP connect to a node
    first_byte_timeout: float = 300.0  # a cold load of a big model can be silent for minutes
    idle_timeout: float = 120.0  # longest silence between chunks of a running stream
    context_protection: str | None = None  # None: the stored runtime setting (strip at first)
    retention_days: float = 30.0
    max_body_mb: float = 64.0
    max_retries: int = 2  # further nodes tried at once when one fails before the first byte
    drain_timeout: float = 30.0  # at shutdown, how long running requests may take to finish


# =============================================================================================
# Helpers: model names, herd's own calls to nodes, errors in each API's shape, Ollama's replies
# =============================================================================================

GB = 1024 ** 3
MB = 1024 * 1024
NODE_CALL_TIMEOUT = 3.0  # herd's own short calls to a node (polls, /api/show): a healthy one answers at once


def normalize_model(name):
    """`llama3.2` and `llama3.2:latest` are one model: give every name an explicit tag."""
    name = (name or "").strip()
    if not name:
        return name
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else name + ":latest"


def control_session():
    """A requests Session for herd's own calls to nodes (polls, /api/show, pulls, preloads):
    proxy settings from the environment must not reroute traffic inside the home lab."""
    session = requests.Session()
    session.trust_env = False
    return session


def is_loopback(address):
    return address in ("127.0.0.1", "::1", "localhost") or (address or "").startswith("127.")


def api_of(path):
    return "openai" if path.startswith("/v1/") else "ollama"


class HerdError(Exception):
    """An error with a status and a message meant for the client."""

    def __init__(self, status, message, code="herd_error", retry_after=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


class RoutingError(HerdError):
    """No node can take the request now (or ever): the status and message say which."""


OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                      413: "invalid_request_error", 429: "rate_limit_error"}


def error_body(api, status, message, code="herd_error"):
    """The JSON body of an error: Ollama `{"error": msg}`, OpenAI `{"error": {message, type, code}}`."""
    if api == "openai":
        kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": message, "type": kind, "code": code}}
    return {"error": message}


def error_response(api, status, message, code="herd_error", retry_after=None):
    response = Response(json.dumps(error_body(api, status, message, code)), status=status,
                        mimetype="application/json")
    if retry_after is not None:
        response.headers["Retry-After"] = str(int(retry_after))
    return response


def stream_error_chunk(api, message):
    """The last chunk of a stream that broke after its first byte, in the stream's own framing."""
    if api == "openai":
        return b"data: " + json.dumps(error_body("openai", 502, message, "upstream_error")).encode() + b"\n\n"
    return json.dumps({"error": message, "done": True}).encode() + b"\n"


# -- what a reply says: Ollama reports counts and durations at the end of every reply ----------

TAIL_BYTES = 2048  # the end of a reply, kept to read token counts and the done marker
REPLY_FIELD = re.compile(rb'"(prompt_eval_count|eval_count|prompt_tokens|completion_tokens|load_duration|'
                         rb'prompt_eval_duration|eval_duration)"\s*:\s*(\d+)')


@dataclass(slots=True)
class ReplyStats:
    """What the end of one reply says: token counts, and the node's own timings when it gave them
    (native API) or chunk timing (OpenAI streams)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    timings: dict | None = None  # eval_count, eval_s, prompt_count, prompt_s, load_s (or first_byte_s: Exchange.finish)


def read_reply(tail, ttft_ms=None, latency_ms=None, events=0):
    """ReplyStats from the last bytes of a reply, in one pass over them. `events`: the OpenAI stream
    events relayed, which count the tokens when the node did not report usage (the last two, the
    finish reason and [DONE], carry none)."""
    found = {key: int(value) for key, value in REPLY_FIELD.findall(tail)}
    prompt = found.get(b"prompt_eval_count") or found.get(b"prompt_tokens")
    completion = found.get(b"eval_count") or found.get(b"completion_tokens")
    if completion is None and events > 2:
        completion = found[b"completion_tokens"] = events - 2
    timings = None
    if b"eval_duration" in found or b"prompt_eval_duration" in found:
        timings = {"eval_count": found.get(b"eval_count"), "eval_s": found.get(b"eval_duration", 0) / 1e9,
                   "prompt_count": found.get(b"prompt_eval_count"),
                   "prompt_s": found.get(b"prompt_eval_duration", 0) / 1e9,
                   "load_s": found.get(b"load_duration", 0) / 1e9}
    elif found.get(b"completion_tokens") and ttft_ms is not None and latency_ms and latency_ms > ttft_ms:
        timings = {"eval_count": found[b"completion_tokens"], "eval_s": (latency_ms - ttft_ms) / 1000}
    return ReplyStats(prompt, completion, timings)


def upstream_message(data):
    """The error text a node sent, whatever its shape."""
    try:
        parsed = json.loads(data)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        if error:
            return str(error)[:300]
    except (ValueError, RecursionError):
        pass
    return data[:300].decode("utf-8", "replace").strip() or "no body"


# =============================================================================================
# The door: a client request, a heartbeat, a settings or management body, read once and checked
# =============================================================================================
#
# Every body herd reads (a client request, a heartbeat, a settings, pull or delete body) is parsed
# once and checked field by field before anything is stored or forwarded. Each check
# names the field and what was expected, and becomes a 400 in the route's API shape. Fields herd
# does not read pass through untouched: Ollama and OpenAI add fields, and a newer client must work.

MAX_JSON_DEPTH = 64  # nesting deeper than any real request (tool schemas included) needs
MAX_NAME_CHARS = 256  # a model name, an app tag, a user
MAX_NODE_ID_CHARS = 64
MAX_LIST_ITEMS = 10_000  # messages in a chat, models on a node, inputs to embed
MAX_FALLBACKS = 16
MAX_TAGS = 32
MAX_CONTEXT = 1 << 24  # num_ctx: far beyond any model's context, short of nonsense
# Ollama's runtime options and their JSON types: a wrong type makes Ollama answer 500, which
# would blame a healthy node, so herd checks them. Options it does not know pass through.
WHOLE_OPTIONS = {"num_ctx": (1, MAX_CONTEXT), "num_predict": (-2, MAX_CONTEXT), "num_keep": (-1, MAX_CONTEXT),
                 "seed": (-(1 << 63), (1 << 63) - 1), "top_k": (0, 1 << 31), "repeat_last_n": (-1, MAX_CONTEXT),
                 "num_batch": (1, 1 << 20), "num_gpu": (-1, 1 << 20), "main_gpu": (0, 1024),
                 "num_thread": (0, 1 << 16)}
REAL_OPTIONS = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                "frequency_penalty", "tfs_z", "mirostat_tau", "mirostat_eta")
FLAG_OPTIONS = ("use_mmap", "numa", "penalize_newline", "low_vram", "f16_kv", "vocab_only", "use_mlock")
# An Ollama model reference as `ollama pull` takes it: [host/][namespace/]name[:tag], letters,
# digits, '_', '-', '.' (no dot in a namespace, never two in a row), at most 128 characters.
MODEL_REFERENCE = re.compile(r"(?:[A-Za-z0-9_.-]+/)?(?:[A-Za-z0-9_-]+/)?[A-Za-z0-9_.-]+(?::[A-Za-z0-9_.-]+)?")
MAX_REFERENCE_CHARS = 128
STREAMING_DEFAULT = {"/api/chat": True, "/api/generate": True}  # Ollama streams unless told not to


def describe_value(value):
    """A short, safe picture of a bad value for an error message (ASCII, escaped, cut short)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"[:60]
    if isinstance(value, str):
        return f"the string {ascii(value[:40])}" + ("..." if len(value) > 40 else "")
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


class BadInput(HerdError):
    """A body or field that herd refuses at the door: 400, naming the field."""

    def __init__(self, field_name, expected, got=None, code="invalid_field"):
        where = f'"{field_name}"' if field_name else "the body"
        shown = "" if got is None else f"; got {describe_value(got)}"
        super().__init__(400, f"{where} must be {expected}{shown}", code)
        self.field = field_name


def reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def too_deep(value):
    """Is `value` nested deeper than MAX_JSON_DEPTH? Level by level, without recursion (it is what
    is being checked): each container is looked at once."""
    level = [value]
    for _ in range(MAX_JSON_DEPTH):
        deeper = []
        for item in level:
            for child in (item.values() if type(item) is dict else item):
                if type(child) is dict or type(child) is list:
                    deeper.append(child)
        if not deeper:
            return False
        level = deeper
    return True


STRICT_JSON = json.JSONDecoder(parse_constant=reject_constant, parse_float=finite_float)  # built once: it is not cheap


# arrays and objects in one body, counted as [ and { bytes before parsing: a 128k-token prompt is
# about half a megabyte, while ten million empty arrays (30 MB) take Python seconds to parse,
# holding the interpreter's lock against every other request. Over the limit the count is made
# again without the brackets inside strings (code or JSON documents sent to embed have many).
MAX_JSON_CONTAINERS = 1_000_000


def parse_json(raw, what="request body"):
    """Parse a JSON body strictly: no NaN or Infinity, numbers that fit a double, nesting at most
    MAX_JSON_DEPTH, at most MAX_JSON_CONTAINERS arrays and objects. Raises BadInput or HerdError."""
    if not isinstance(raw, bytes):
        raw = raw.encode("utf-8", "surrogatepass")
    encoding = json.detect_encoding(raw)
    if encoding not in ("utf-8", "utf-8-sig"):  # in UTF-16 and -32 a quote or bracket byte can be half
        try:                                     # of another character: counted in UTF-8
            raw, encoding = raw.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass"), "utf-8"
        except UnicodeDecodeError as exc:
            raise HerdError(400, f"{what} is not valid JSON ({str(exc)[:120]}); send a JSON object",
                            "invalid_json") from None
    brackets = raw.count(b"[") + raw.count(b"{")
    if brackets > MAX_JSON_CONTAINERS:
        outside = brackets_outside_strings(raw, MAX_JSON_CONTAINERS)
        if outside is None:
            raise HerdError(413, f"{what} has {brackets:,} [ and {{ characters and more than "
                            f"{MAX_JSON_CONTAINERS:,} strings; herd parses at most {MAX_JSON_CONTAINERS:,} "
                            "arrays and objects and does not sort out brackets from text in that many "
                            "strings: send fewer", "body_too_complex")
        brackets = outside
    if brackets > MAX_JSON_CONTAINERS:
        raise HerdError(413, f"{what} has {brackets:,} arrays and objects, more than the "
                        f"{MAX_JSON_CONTAINERS:,} herd parses; no request to a model needs that many: "
                        "send fewer", "body_too_complex")
    try:
        text = raw.decode(encoding, "surrogatepass")
        value = STRICT_JSON.decode(text)
    except RecursionError:
        raise BadInput("", f"JSON nested at most {MAX_JSON_DEPTH} deep", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HerdError(400, f"{what} is not valid JSON ({str(exc)[:120]}); send a JSON object",
                        "invalid_json") from None
    if brackets > MAX_JSON_DEPTH and too_deep(value):
        raise BadInput("", f"JSON nested at most {MAX_JSON_DEPTH} deep", code="invalid_json")
    return value


def brackets_outside_strings(raw, most):
    """[ and { bytes of a JSON text that are not inside its strings (escaped backslashes and quotes
    dropped, every other part between quotes is outside one), or None when it has more than `most`
    strings: telling that many apart takes longer than parsing them (15 million: 2.7 s)."""
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    if text.count(b'"') > 2 * most:
        return None
    outside = b"".join(text.split(b'"')[::2])
    return outside.count(b"[") + outside.count(b"{")


def is_clean_text(text):
    """Printable: no control or bidi-override characters, no lone surrogates."""
    return text.isprintable()


def read_text(value, field_name, max_chars=MAX_NAME_CHARS, optional=False):
    """A short printable string (a name, an id, a tag)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadInput(field_name, "a non-empty string", value)
    if len(value) > max_chars:
        raise BadInput(field_name, f"at most {max_chars} characters long (it has {len(value)})")
    if not is_clean_text(value):
        raise BadInput(field_name, "printable text (no control or bidi characters, no lone surrogates)", value)
    return value


def read_whole(value, field_name, low, high, optional=False):
    """A whole number in [low, high]; 8192.0 counts as 8192."""
    if value is None and optional:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadInput(field_name, "a whole number", value)
    if not low <= value <= high:
        raise BadInput(field_name, f"between {low} and {high}", value)
    return value


def read_real(value, field_name, low=-1e12, high=1e12, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise BadInput(field_name, f"a number between {low:g} and {high:g}", value)
    return float(value)


def read_kind(value, field_name, kind, expected, optional=False):
    """`value` when it is a `kind` (or None and `optional`); else BadInput saying `expected`."""
    if value is None and optional:
        return None
    if not isinstance(value, kind):
        raise BadInput(field_name, expected, value)
    return value


def read_flag(value, field_name, optional=False):
    return read_kind(value, field_name, bool, "true or false", optional)


def read_object(value, field_name, optional=False):
    return read_kind(value, field_name, dict, "an object", optional)


def read_list(value, field_name, max_items=MAX_LIST_ITEMS, optional=False):
    if read_kind(value, field_name, list, "a list", optional) is None:
        return None
    if len(value) > max_items:
        raise BadInput(field_name, f"a list of at most {max_items} items", f"{len(value)} items")
    return value


def read_string(value, field_name, optional=True):
    """Free text (a prompt, a message): any string, or nothing."""
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise BadInput(field_name, "a string", value)
    return value


def is_model_reference(name):
    """Could `ollama pull` take this name?"""
    return (len(name) <= MAX_REFERENCE_CHARS and ".." not in name
            and MODEL_REFERENCE.fullmatch(name) is not None)


def read_options(options):
    """Check the Ollama options whose types are known (see WHOLE_OPTIONS)."""
    for key, value in options.items():
        if value is None:
            continue
        if key in WHOLE_OPTIONS:
            read_whole(value, f"options.{key}", *WHOLE_OPTIONS[key])
        elif key in REAL_OPTIONS:
            read_real(value, f"options.{key}")
        elif key in FLAG_OPTIONS:
            read_flag(value, f"options.{key}")
        elif key == "stop":
            for i, item in enumerate(read_list(value, "options.stop", 64)):
                read_string(item, f"options.stop[{i}]", optional=False)


def read_messages(messages, field_name="messages"):
    """Chat messages: objects whose content is a string, null, or (OpenAI) a list of parts whose
    `text`, when present, is a string. Returns the characters of text they hold."""
    chars = 0
    for i, message in enumerate(read_list(messages, field_name)):
        where = f"{field_name}[{i}]"
        read_object(message, where)
        role = message.get("role")
        if role is not None:
            read_text(role, f"{where}.role", 64)
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                read_object(part, f"{where}.content[{j}]")
                if "text" in part:
                    chars += len(read_string(part["text"], f"{where}.content[{j}].text", optional=False))
        elif content is not None:
            raise BadInput(f"{where}.content", "a string or a list of content parts", content)
        images = message.get("images")
        if images is not None:
            for j, image in enumerate(read_list(images, f"{where}.images")):
                read_string(image, f"{where}.images[{j}]", optional=False)
    return chars


def read_inputs(value, endpoint):
    """`input` to embed: a string or a list of strings (OpenAI also takes token lists)."""
    if isinstance(value, str):
        return len(value)
    items = read_list(value, "input")
    if endpoint == "/v1/embeddings" and all(isinstance(item, (int, list)) and not isinstance(item, bool)
                                            for item in items):
        return 4 * sum(len(item) if isinstance(item, list) else 1 for item in items)  # tokens
    return sum(len(read_string(item, f"input[{i}]", optional=False)) for i, item in enumerate(items))


def read_prompt_chars(body, endpoint):
    """Check the prompt-bearing fields herd reads, and count their characters (a cheap stand-in
    for the prompt's tokens)."""
    chars = 0
    if "messages" in body:
        chars += read_messages(body["messages"])
    if "prompt" in body:
        prompt = body["prompt"]
        if endpoint == "/v1/completions" and isinstance(prompt, list):
            chars += sum(len(item) for item in prompt if isinstance(item, str))
        else:
            chars += len(read_string(prompt, "prompt"))
    chars += len(read_string(body.get("system"), "system"))
    if "input" in body:
        chars += read_inputs(body["input"], endpoint)
    if body.get("images") is not None:
        for i, image in enumerate(read_list(body["images"], "images")):
            read_string(image, f"images[{i}]", optional=False)
    if body.get("tools") is not None:
        for i, tool in enumerate(read_list(body["tools"], "tools", 1024)):
            read_object(tool, f"tools[{i}]")
    return chars


PREFIX_BLOCK_CHARS = 2048  # a long message or prompt is hashed in blocks of this many characters
MAX_PREFIX_BLOCKS = 512  # beyond this many blocks (a million characters) a prompt's rest is not tracked
PREFIX_ENDPOINTS = frozenset({"/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions"})


@dataclass(frozen=True, slots=True)
class Prefix:
    """A prompt as Ollama's runner caches it, in order: a chain of hashes, block by block (a chat
    message by message, long ones in PREFIX_BLOCK_CHARS blocks; a generation's system and prompt
    in blocks), the characters up to each block, and which blocks hold an assistant's reply."""

    hashes: tuple = ()
    ends: tuple = ()
    replies: tuple = ()


def prompt_prefix(body, endpoint):
    """The Prefix of a checked request body (empty for embeddings: nothing is cached)."""
    if endpoint not in PREFIX_ENDPOINTS:
        return Prefix()
    if "messages" in body:
        parts = []
        for message in body["messages"] or ():
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(part.get("text") or "" for part in content)
            images = message.get("images")
            parts.append((message.get("role") or "", (content or "") + (f"[{len(images)} images]" if images else "")))
    else:
        prompt = body.get("prompt")
        text = "".join(p for p in prompt if isinstance(p, str)) if isinstance(prompt, list) else prompt or ""
        if not text:
            return Prefix()  # an empty prompt only loads the model: the runner takes no slot
        parts = [("system", body.get("system") or ""), ("user", text)]
    hashes, ends, replies, chain, total = [], [], [], 0, 0
    for role, text in parts:
        for start in range(0, max(len(text), 1), PREFIX_BLOCK_CHARS):
            block = text[start:start + PREFIX_BLOCK_CHARS]
            chain = hash((chain, role, block))
            total += len(block)
            hashes.append(chain)
            ends.append(total)
            replies.append(role == "assistant")
            if len(hashes) >= MAX_PREFIX_BLOCKS:
                return Prefix(tuple(hashes), tuple(ends), tuple(replies))
    return Prefix(tuple(hashes), tuple(ends), tuple(replies))


def never():
    return False


@dataclass(slots=True)
class Call:
    """One client request as herd understands it, read once at the door into checked values."""

    api: str  # ollama | openai
    endpoint: str  # the path forwarded to the node, e.g. /api/chat
    body: dict
    raw: bytes  # forwarded unchanged unless herd had to edit the body
    model: str  # normalised name asked for
    stream: bool
    fallback_models: list
    tags: list
    client_ip: str
    request_id: str
    started: float  # perf_counter at the door
    prompt_chars: int = 0
    prefix: Prefix = Prefix()  # the prompt as the node's cache would hold it
    asked_name: str | None = None  # the model name exactly as the client wrote it
    edited: bool = False  # body must be re-serialised before forwarding (see body_for)
    client_options: dict | None = None  # the options as the client sent them (each attempt starts from them)
    options_edited: bool = False  # this attempt changed them...
    added_options: bool = False  # ...or only added `options` the client did not send
    pin: str | None = None  # a node chosen by the client (X-Herd-Node) for model management
    method: str = "POST"
    may_change_fleet: bool = False  # set for model management; any call with the key, or from loopback
    # when no key is set, may change the fleet too (Proxy._lease works that out when it matters)
    only_node: str | None = None  # route only to this node (herd's own benchmark runs)
    user_agent: str = ""
    client_gone: object = never  # Waitress tells when the client has left
    substitute: str | None = None  # a loaded model of the same kind, when nothing can load `model`
    events: list = field(default_factory=list)  # what herd did: retries, strips, fallbacks (traced)

    def candidate_models(self):
        """The asked model, the client's fallbacks in order, then herd's VRAM substitute."""
        return [self.model] + self.fallback_models + ([self.substitute] if self.substitute else [])

    def note(self, event):
        self.events.append(event)

    def options(self):
        options = self.body.get("options")
        return options if isinstance(options, dict) else {}


def header_text(value):
    """A request header as the client wrote it: WSGI hands over its bytes as Latin-1, and clients
    send UTF-8 (a tag "café" arrives as "cafÃ©")."""
    if not value or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value  # not UTF-8: Latin-1 it was


def read_tags(body, headers, api):
    """Tags for per-app analytics: metadata.tags, the X-Herd-Tags header, OpenAI's user."""
    tags = []
    metadata = read_object(body.get("metadata"), "metadata", optional=True)
    if metadata is not None and metadata.get("tags") is not None:
        for i, tag in enumerate(read_list(metadata["tags"], "metadata.tags", MAX_TAGS)):
            tags.append(read_text(tag, f"metadata.tags[{i}]", 64))
    header = headers.get("X-Herd-Tags")
    if header:
        for tag in (t.strip() for t in header.split(",")):
            if tag:
                tags.append(read_text(tag, "X-Herd-Tags", 64))
    if api == "openai" and body.get("user") not in (None, ""):
        tags.append("user:" + read_text(body["user"], "user"))
    return tags[:MAX_TAGS]


def read_user_agent(value):
    """A client's User-Agent as herd keeps it (traces, the Apps view): printable ASCII, cut short."""
    value = (value or "")[:200]
    if value.isascii() and value.isprintable():
        return value
    return "".join(c if " " <= c <= "~" else "?" for c in value)


def parse_call(api, endpoint, raw, headers, client_ip, request_id):
    """Read a proxied request at the door into a Call; raises HerdError(400) naming the field."""
    started = time.perf_counter()
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadInput("", "a JSON object", body, code="invalid_json")
    asked = body.get("model") or body.get("name")  # Ollama still accepts the older "name"
    if asked is None or asked == "":
        raise HerdError(400, 'the request has no "model"; name the model to run, e.g. "llama3.2"',
                        "missing_model")
    read_text(asked, "model" if body.get("model") else "name")
    spaced = asked != asked.strip()  # " llama3.2 " is routed as llama3.2: the node must be sent that too
    if spaced:
        asked = body["model" if body.get("model") else "name"] = asked.strip()
    stream = read_flag(body.get("stream"), "stream", optional=True)
    fallbacks = [read_text(m, f"fallback_models[{i}]") for i, m in
                 enumerate(read_list(body.get("fallback_models"), "fallback_models", MAX_FALLBACKS, optional=True) or ())]
    tags = read_tags(body, headers, api)
    options = read_object(body.get("options"), "options", optional=True)
    if options:
        read_options(options)
    for key in ("max_tokens", "max_completion_tokens"):
        read_whole(body.get(key), key, 1, MAX_CONTEXT, optional=True)
    prompt_chars = read_prompt_chars(body, endpoint)
    # herd's own fields are not for the node; a body not in plain UTF-8 (UTF-16, a BOM) is sent
    # re-encoded, as Ollama reads UTF-8 only
    edited = spaced or "fallback_models" in body or "metadata" in body or json.detect_encoding(raw) != "utf-8"
    body.pop("fallback_models", None)
    body.pop("metadata", None)
    return Call(api=api, endpoint=endpoint, body=body, raw=raw, model=normalize_model(asked),
                stream=STREAMING_DEFAULT.get(endpoint, False) if stream is None else stream,
                fallback_models=[normalize_model(m) for m in fallbacks], tags=tags, client_ip=client_ip,
                client_options=dict(options) if isinstance(options, dict) else None,
                request_id=request_id, started=started, prompt_chars=prompt_chars,
                prefix=prompt_prefix(body, endpoint), asked_name=asked,
                edited=edited, user_agent=read_user_agent(headers.get("User-Agent")))


def read_management(raw, verb):
    """(model, stream) from a pull or delete body ({"model": ...} or the older {"name": ...})."""
    body = parse_json(raw or b"{}")
    if not isinstance(body, dict):
        raise BadInput("", "a JSON object", body, code="invalid_json")
    asked = body.get("model") or body.get("name")
    if asked is None or asked == "":
        raise HerdError(400, f'name the model in "model" for {verb}', "missing_model")
    model = normalize_model(read_text(asked, "model" if body.get("model") else "name"))
    stream = read_flag(body.get("stream"), "stream", optional=True)
    return body, model, stream is not False


# -- heartbeats: untrusted input too, checked whole and applied whole or not at all ------------

MAX_MEMORY_GB = 1 << 20  # a petabyte: past any one machine
MAX_MODEL_BYTES = 1 << 50


def read_url(value, field_name):
    """An http(s) URL with a host, no whitespace or control characters."""
    text = read_text(value, field_name, 2048)
    if any(c.isspace() for c in text):
        raise BadInput(field_name, "a URL without spaces", value)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise BadInput(field_name, "an http(s) URL such as http://gpu-box:11434", value) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInput(field_name, "an http(s) URL such as http://gpu-box:11434", value)
    return text.rstrip("/")


def read_model_entry(entry, where, loaded):
    """One /api/tags (or, `loaded`, /api/ps) entry, keeping only the fields herd reads or shows."""
    read_object(entry, where)
    name = entry.get("name") or entry.get("model")
    clean = {"name": read_text(name, f"{where}.name"), "model": read_text(entry.get("model") or name, f"{where}.model"),
             "size": read_whole(entry.get("size") or 0, f"{where}.size", 0, MAX_MODEL_BYTES)}
    for key in ("digest", "modified_at", "expires_at"):  # shown only: an odd one is left out
        if is_detail(entry.get(key)):
            clean[key] = entry[key]
    if loaded:
        if entry.get("size_vram") is not None:
            clean["size_vram"] = read_whole(entry["size_vram"], f"{where}.size_vram", 0, MAX_MODEL_BYTES)
        if entry.get("context_length") is not None:
            clean["context_length"] = read_whole(entry["context_length"], f"{where}.context_length", 1, MAX_CONTEXT)
    details = read_object(entry.get("details"), f"{where}.details", optional=True)
    if details is not None:  # shown, never routed on: an odd value is left out, not the node
        clean["details"] = {key: value for key, value in details.items() if is_detail(key) and is_detail(value)}
        families = details.get("families")
        if isinstance(families, list):
            clean["details"]["families"] = [f for f in families[:16] if is_detail(f)]
    return clean


def is_detail(value):
    """A model detail herd keeps to show (family, quantization...): short printable text."""
    return isinstance(value, str) and 0 < len(value) <= 128 and is_clean_text(value)


def read_ollama_block(ollama, where="ollama"):
    """The `ollama` block of a heartbeat (or of herd's own poll): reachable, version, models, loaded."""
    read_object(ollama, where)
    reachable = read_flag(ollama.get("reachable"), f"{where}.reachable")
    clean = {"reachable": reachable,
             "version": read_text(ollama.get("version"), f"{where}.version", 64, optional=True),
             "error": read_text(ollama.get("error"), f"{where}.error", 2000, optional=True)}
    if reachable:
        clean["models"] = [read_model_entry(m, f"{where}.models[{i}]", False)
                           for i, m in enumerate(read_list(ollama.get("models") or [], f"{where}.models"))]
        clean["loaded"] = [read_model_entry(m, f"{where}.loaded[{i}]", True)
                           for i, m in enumerate(read_list(ollama.get("loaded") or [], f"{where}.loaded"))]
    return clean


def read_memory(value, field_name):
    if value is None:
        return None
    read_object(value, field_name)
    return {key: read_real(value.get(key), f"{field_name}.{key}", 0, MAX_MEMORY_GB, optional=True)
            for key in ("total_gb", "available_gb")}


def read_gpu(value):
    """The heartbeat's `gpu` block, with the fields that were sent."""
    if value is None:
        return None
    read_object(value, "gpu")
    clean = {key: read_real(value[key], f"gpu.{key}", 0, MAX_MEMORY_GB, optional=True)
             for key in ("vram_total_gb", "vram_used_gb") if key in value}
    if value.get("kind") is not None:
        clean["kind"] = read_text(value["kind"], "gpu.kind", 32)
    if value.get("unified") is not None:
        clean["unified"] = read_flag(value["unified"], "gpu.unified")
    if value.get("gpus") is not None:
        clean["gpus"] = []
        for i, one in enumerate(read_list(value["gpus"], "gpu.gpus", 64)):
            where = f"gpu.gpus[{i}]"
            read_object(one, where)
            clean["gpus"].append({"name": read_text(one.get("name") or "GPU", f"{where}.name", 128),
                                  **{key: read_real(one.get(key), f"{where}.{key}", 0, MAX_MEMORY_GB, optional=True)
                                     for key in ("vram_total_gb", "vram_used_gb")}})
    return clean


def parse_heartbeat(raw):
    """Read a heartbeat (herd_node.py's payload) whole into checked values; raises BadInput
    naming the first field that is wrong, and then nothing of it is applied."""
    beat = parse_json(raw, "heartbeat body")
    if not isinstance(beat, dict):
        raise BadInput("", "a JSON object", beat, code="invalid_heartbeat")
    missing = [key for key in ("node_id", "ollama_url", "ollama") if beat.get(key) is None]
    if missing:
        raise HerdError(400, f"heartbeat is missing {', '.join(missing)} (herd_node.py sends them)",
                        "invalid_heartbeat")
    return {
        "node_id": read_text(beat["node_id"], "node_id", MAX_NODE_ID_CHARS),
        "ollama_url": read_url(beat["ollama_url"], "ollama_url"),
        "hostname": read_text(beat.get("hostname"), "hostname", 255, optional=True) or "",
        "interval_s": read_real(beat.get("interval_s", 5.0), "interval_s", 0.05, 3600),
        "memory": read_memory(beat.get("memory"), "memory"),
        "gpu": read_gpu(beat.get("gpu")),
        "cpu_percent": read_real(beat.get("cpu_percent"), "cpu_percent", 0, 100, optional=True),
        "num_parallel": read_whole(beat.get("num_parallel"), "num_parallel", 1, 4096, optional=True),
        "memory_budget_gb": read_real(beat.get("memory_budget_gb"), "memory_budget_gb", 0.01, MAX_MEMORY_GB,
                                      optional=True),
        "default_context_length": read_whole(beat.get("default_context_length"), "default_context_length",
                                             256, MAX_CONTEXT, optional=True),
        "ollama": read_ollama_block(beat["ollama"]),
    }


# =============================================================================================
# Nodes: what herd knows of each Ollama machine, and of the requests it runs there
# =============================================================================================

MISSED_INTERVALS_OFFLINE = 3  # a node that misses this many of its own intervals is offline
SWITCH_GRACE_S = 10.0  # a (re)load herd started is believed over reports for this long after it should be done
# Ollama's old default context, when nothing better is known. A node's own default (recent Ollama
# picks 4k, 32k or 256k by VRAM; OLLAMA_CONTEXT_LENGTH overrides it) is reported by the agent when
# it can read it, else seen: a model served or loaded without num_ctx runs with it in /api/ps.
DEFAULT_NUM_CTX = 4096
# Options whose change makes Ollama unload and reload a model (num_ctx aside, handled on its own).
RELOAD_OPTIONS = ("num_gpu", "num_batch", "num_thread", "use_mmap")
RECENT_SAMPLES = 32  # recent samples kept per node for each speed, and per model for demand
# How streams on one node slow each other is learnt per node from its replies (learn_from_reply);
# until a node has shown it, herd assumes: n streams of one model each run at n ^ -0.3 of one
# alone (parallel slots decode in one batch, memory-bound: a few streams cost little each), and m
# models at once each run at 1/m (they take turns at the memory bandwidth).
BATCH_SLOWDOWN = 0.3
CROSS_SLOWDOWN = 1.0
SHARING_SAMPLES = 3  # replies that ran shared before a node's own exponent replaces the prior


def keep_recent(samples, value):
    """Append `value`, dropping the oldest beyond RECENT_SAMPLES."""
    samples.append(value)
    if len(samples) > RECENT_SAMPLES:
        del samples[0]


class Recent:
    """The last RECENT_SAMPLES values, also kept in order of size, so that a quantile of them is a
    lookup rather than a sort (every reply adds one; every decision reads one)."""

    __slots__ = ("arrivals", "ordered", "size")

    def __init__(self, size=RECENT_SAMPLES):
        self.arrivals = collections.deque()
        self.ordered = []
        self.size = size

    def add(self, value):
        self.arrivals.append(value)
        bisect.insort(self.ordered, value)
        if len(self.arrivals) > self.size:
            del self.ordered[bisect.bisect_left(self.ordered, self.arrivals.popleft())]

    def quantile(self, q):
        """The value q of the way up (0.25: the lower quartile), or None without any."""
        return self.ordered[int(len(self.ordered) * q)] if self.ordered else None

    def share_above(self, value):
        """The share of the values larger than `value`, or None without any."""
        if not self.ordered:
            return None
        return (len(self.ordered) - bisect.bisect_right(self.ordered, value)) / len(self.ordered)

    def __len__(self):
        return len(self.ordered)


def entry_bytes(entry):
    """Memory a /api/ps (or /api/tags) entry takes: in VRAM, or all of it when on the CPU."""
    return entry.get("size_vram") or entry.get("size") or 0


def most_common(values):
    """The most frequent of `values` (the largest on a tie), or None when there are none."""
    counts = collections.Counter(v for v in values if v)
    return max(counts, key=lambda v: (counts[v], v)) if counts else None


@dataclass(eq=False, slots=True)
class Lease:
    """A granted slot: this request may run `model` on `node` until it releases the lease.
    It carries what the node had loaded when it was chosen, for context protection, and the
    decision that chose it, for the trace."""

    node_id: str
    url: str
    model: str
    score: float
    breakdown: dict
    eta_s: float = 0.0  # expected seconds from now until the reply is complete
    started: float = 0.0  # time.monotonic() when the slot was taken
    company_at_start: tuple = (1, 1)  # (streams of its model, models) running when it started
    loaded_ctx: int | None = None  # context the model runs with there; None when cold
    cold: bool = False  # herd expected a load or a context reload
    reload: bool = False  # ...and it is a context reload
    load_s: float = 0.0  # the seconds of (re)load herd expected
    prompt_s: float = 0.0  # ...and of prompt evaluation
    timed_alone: bool = True  # nothing held its load up there: another load, busy models pushed out
    drain: tuple = ()  # a reload's: the leases of its model running there, which Ollama lets end first
    ended: float | None = None  # time.monotonic() when it was released
    decision: dict | None = None  # the candidates and the excluded nodes, for the trace (see decision_record)
    default_ctx: int = DEFAULT_NUM_CTX
    pin_ctx: bool = False  # the running context is reported but the default is a guess: send num_ctx
    load_options: dict = field(default_factory=dict)
    queued_ms: float = 0.0
    held: bool = True  # False for reads that take no slot
    released: bool = False
    answered: bool = False  # the node has sent its first byte
    prompt_slot: SlotCache | None = None  # the slot whose cache its prompt went into (see take_slot)...
    slot_before: tuple | None = None  # ...and what that slot held before, should the attempt fail


@dataclass(slots=True)
class Running:
    """The requests one node runs for one model now, kept so that scoring reads them in O(1)
    however many there are."""

    count: int = 0
    eta_sum: float = 0.0
    start_sum: float = 0.0
    ends: list = field(default_factory=list)  # when each is expected to end (monotonic s), sorted
    unanswered: collections.deque = field(default_factory=collections.deque)  # in the order they started
    leases: set = field(default_factory=set)

    def add(self, lease):
        self.leases.add(lease)
        self.count += 1
        self.eta_sum += lease.eta_s
        self.start_sum += lease.started
        bisect.insort(self.ends, lease.started + lease.eta_s)
        self.unanswered.append(lease)

    def remove(self, lease):
        self.leases.discard(lease)
        self.count -= 1
        if self.count <= 0:  # start afresh rather than carry rounding errors
            self.count, self.eta_sum, self.start_sum, self.ends = 0, 0.0, 0.0, []
            self.unanswered.clear()
            self.leases.clear()
            return
        self.eta_sum -= lease.eta_s
        self.start_sum -= lease.started
        index = bisect.bisect_left(self.ends, lease.started + lease.eta_s)
        del self.ends[min(index, len(self.ends) - 1)]

    def _least(self):
        """A request running past its estimate still has a tenth of it to go (it is not done)."""
        return 0.1 * self.eta_sum / self.count

    def _left(self, end, now):
        """Seconds a request expected to end at `end` still runs. One past its estimate was held up
        by something herd did not foresee (a reply longer than usual, a load it waits behind): as
        long again as it is overdue is the guess, as the time a delay has lasted is the best guess
        of how long it goes on."""
        return max(self._least(), end - now if end >= now else now - end)

    def mean_remaining(self, now):
        if self.count <= 0:
            return 0.0
        mean_eta = self.eta_sum / self.count
        return max(0.1 * mean_eta, mean_eta - (now - self.start_sum / self.count))

    def longest_remaining(self, now):
        if self.count <= 0:
            return 0.0
        ends = self.ends  # the latest to end, or the most overdue: _left of both, written out
        return max(0.1 * self.eta_sum / self.count, ends[-1] - now, now - ends[0])

    def nth_remaining(self, n, now):
        """Seconds until the n-th (from 0) of these requests is expected to end: the ends to come
        and the overdue ones merged, each in the order of what it has left."""
        ends = self.ends
        due = bisect.bisect_left(ends, now)  # ends[due:] are to come, soonest first
        late = due - 1  # ends[:due] are overdue, the least overdue (the soonest done) last
        for _ in range(min(n, len(ends) - 1)):
            if due < len(ends) and (late < 0 or ends[due] - now <= now - ends[late]):
                due += 1
            else:
                late -= 1
        if due < len(ends) and (late < 0 or ends[due] - now <= now - ends[late]):
            return self._left(ends[due], now)
        return self._left(ends[late], now)

    def stalled(self, now):
        """Seconds the oldest request that has not answered yet is past twice its estimate (0 when
        none is). The node is holding it back (waiting to unload a busy model, loading, swapping),
        and a request for the same model sent there now is likely held back as long."""
        waiting = self.unanswered
        while waiting and (waiting[0].answered or waiting[0].released):
            waiting.popleft()
        if not waiting:
            return 0.0
        return max(0.0, now - waiting[0].started - 2 * waiting[0].eta_s)


# -- prompt caches: what each parallel slot of a loaded model most likely holds -----------------
#
# Ollama's runner keeps one input cache per parallel slot of a loaded model. A request takes, of
# the slots no request is using, the one whose cache shares the longest prefix with its prompt, in
# tokens, and evaluates only the rest. Every used slot shares at least the template's first
# tokens with any prompt, so an unrelated prompt overwrites the lowest free slot that was used
# before it takes an empty one; the slot then holds the prompt and the reply generated there. A
# reload or an eviction empties them all. herd keeps the same slots per node
# and model (as Prefixes: hashes, not text), takes one as the runner would for every request it
# sends and frees it when the reply ends, so it knows what each request will find cached, and
# what it will overwrite.
MAX_TRACKED_SLOTS = 32  # slots followed per model: more (a large OLLAMA_NUM_PARALLEL) make choices slow


@dataclass(slots=True)
class SlotCache:
    prefix: Prefix = Prefix()
    used: float = 0.0  # time.monotonic() when its last request ended (0: never used)
    busy: bool = False  # a request herd sent runs in it now
    index: int = 0  # its place in the runner's order


class ModelSlots:
    """One loaded model's parallel slots on a node. The runner fills them lowest first and takes a
    used one before an empty one, so the slots that were ever taken are the lowest: `held`, in
    order, at most MAX_TRACKED_SLOTS of them; the rest (up to `count`) are empty, or hold what
    herd no longer follows. `free` are the held ones no request uses, in order.

    A block's hash chains every block before it, so a hash names a whole prefix: `free_blocks`
    counts, per hash, the free slots whose prompt starts with that prefix, `free_ends` the free
    slots whose prompt is exactly it, and `held_blocks` the held slots (busy or not) whose prompt
    starts with it. A choice then looks up the prompt's hashes instead of comparing slot by slot."""

    __slots__ = ("count", "held", "free", "free_blocks", "free_ends", "held_blocks")

    def __init__(self, count):
        self.count, self.held, self.free = count, [], []
        self.free_blocks, self.free_ends, self.held_blocks = {}, {}, {}

    def take(self, slot, prefix):
        """A request with `prefix` starts in `slot` (from choose_slot): it holds that prompt now."""
        if slot.index >= len(self.held):  # the next empty one: followed while there is room
            if len(self.held) < MAX_TRACKED_SLOTS:
                self.held.append(slot)
                count_hashes(self.held_blocks, prefix.hashes, +1)
        else:
            self.free.remove(slot)
            self._count_free(slot, -1)
            count_hashes(self.held_blocks, slot.prefix.hashes, -1)
            count_hashes(self.held_blocks, prefix.hashes, +1)
        slot.prefix, slot.busy = prefix, True

    def give_back(self, slot, prefix=None):
        """The request in `slot` ended; `prefix`: what the slot holds now, when not its prompt (an
        attempt that failed leaves it as it was). A slot of the model's previous load is not kept."""
        if not slot.busy:
            return
        slot.busy = False
        mine = self.follows(slot)
        if prefix is not None:
            if mine:
                count_hashes(self.held_blocks, slot.prefix.hashes, -1)
                count_hashes(self.held_blocks, prefix.hashes, +1)
            slot.prefix = prefix
        if mine:
            bisect.insort(self.free, slot, key=lambda s: s.index)
            self._count_free(slot, +1)

    def follows(self, slot):
        """Is `slot` one of these held slots (not untracked, not of the model's previous load)?"""
        return slot.index < len(self.held) and self.held[slot.index] is slot

    def _count_free(self, slot, step):
        hashes = slot.prefix.hashes
        count_hashes(self.free_blocks, hashes, step)
        count_hashes(self.free_ends, hashes[-1:], step)

    def longest(self, hashes, counts, least=1):
        """How many leading blocks of `hashes` at least `least` slots counted in `counts` hold."""
        low, high = 0, len(hashes)  # a slot holding a prefix holds every shorter one: by halves
        while low < high:
            middle = (low + high + 1) // 2
            if counts.get(hashes[middle - 1], 0) >= least:
                low = middle
            else:
                high = middle - 1
        return low


def count_hashes(counts, hashes, step):
    """Add `step` to each hash's count in `counts`, dropping counts that reach 0."""
    for h in hashes:
        left = counts.get(h, 0) + step
        if left:
            counts[h] = left
        else:
            del counts[h]


def after_reply(prefix, blocks):
    """`blocks` of `prefix`, and the assistant reply right after them (a slot whose whole prompt
    was those blocks generated it, so it holds it too)."""
    while blocks < len(prefix.replies) and prefix.replies[blocks]:
        blocks += 1
    return blocks


def choose_slot(slots, prefix):
    """(the slot Ollama's runner starts `prefix` on, blocks of it cached there): of the free slots,
    the one sharing the most, a used one before an empty one (it shares the template's first
    tokens), the first among equals; (None, 0) when every slot is in use."""
    wanted = prefix.hashes
    shared = slots.longest(wanted, slots.free_blocks)  # the most any free slot shares
    best = shared
    # A slot holding exactly the first blocks holds the reply after them too: more than `shared`
    # only for a slot ending inside the run of reply blocks that reaches past `shared`.
    replies, extended = prefix.replies, after_reply(prefix, shared)
    blocks = shared
    while extended > shared and blocks >= 1 and replies[blocks]:
        if slots.free_ends.get(wanted[blocks - 1]):
            best = extended
            break
        blocks -= 1
    for slot in slots.free:  # the first free slot that holds `best` blocks
        held = slot.prefix.hashes
        if not best:
            if held:
                return slot, 0
        elif len(held) >= best and held[best - 1] == wanted[best - 1]:
            return slot, best
        elif len(held) < best and held and held[-1] == wanted[len(held) - 1] \
                and after_reply(prefix, len(held)) == best:
            return slot, best
    if slots.free and not best:
        return slots.free[0], 0  # an empty slot herd follows (an attempt that failed left it so)
    if len(slots.held) < slots.count:
        return SlotCache(index=len(slots.held)), 0
    return None, 0


def overwritten_chars(slots, slot, blocks):
    """Characters of what `slot` holds that a prompt sharing `blocks` of them overwrites, less what
    another slot of the model also holds (a system prompt two conversations share)."""
    held = slot.prefix
    kept = min(blocks, len(held.hashes))
    if kept == len(held.hashes):
        return 0
    if slots.follows(slot):  # it is counted itself: another slot makes two
        kept = max(kept, slots.longest(held.hashes, slots.held_blocks, least=2))
    return held.ends[-1] - (held.ends[kept - 1] if kept else 0)


# -- follow-ups: how often conversations come back to a cache ----------------------------------
#
# How likely a slot's cache is to be continued, learnt from the traffic. A prompt that holds an
# assistant's reply continues the prompt before that reply, wherever it went: herd counts, apart
# for prompts that hold a reply (a conversation's later turns) and prompts that do not (one-off
# requests and first turns), how many it sent and how many a later prompt continued. A script's
# one-off requests so teach herd that their caches are worth nothing, and a chat's turns that
# theirs mostly are. Every prompt is also remembered by its last block when its reply ends, so
# that the gap until its continuation is seen. Overwriting a cache costs the conversation it
# holds its prompt evaluated again, times the chance that it comes back.
FOLLOW_UP_SAMPLES = 200  # gaps remembered; and prompts of a kind counted before older ones count half
MAX_ENDED = 20_000  # prompts remembered until they are continued (about 2 MB)
MIN_FOLLOW_UP_SAMPLES = 5  # prompts of a kind, or gaps, before they replace the priors below
PRIOR_FOLLOW_UP_SHARE = 0.5  # chat front-ends come back, scripts do not
PRIOR_FOLLOW_UP_S = 300.0  # before gaps are seen, a cache counts until Ollama's default keep_alive


def previous_prompt_end(prefix):
    """The index of the last block of the prompt that `prefix` continues (the blocks before its
    last assistant reply), or None when it holds no reply."""
    replies = prefix.replies
    index = len(replies) - 1
    while index >= 0 and not replies[index]:
        index -= 1
    if index < 0 or len(replies) >= MAX_PREFIX_BLOCKS:
        return None
    while index >= 0 and replies[index]:
        index -= 1
    return index if index >= 0 else None


class FollowUps:
    """What herd saw of conversations coming back (see above)."""

    def __init__(self):
        self.sent = {False: 0.0, True: 0.0}  # prompts sent, by whether they held a reply...
        self.continued = {False: 0.0, True: 0.0}  # ...and how many of them a later prompt continued
        self.ended = collections.OrderedDict()  # last block of a prompt -> time.monotonic() its reply ended
        self.gaps = Recent(FOLLOW_UP_SAMPLES)  # seconds from a reply to the request continuing it

    def started(self, prefix, now):
        """A request with `prefix` is sent: count it, and the prompt it continues, if any."""
        held_reply = any(prefix.replies)
        self.sent[held_reply] += 1
        if self.sent[held_reply] > FOLLOW_UP_SAMPLES:  # recent traffic counts more
            self.sent[held_reply] /= 2
            self.continued[held_reply] /= 2
        index = previous_prompt_end(prefix)
        if index is None:
            return
        self.continued[any(prefix.replies[:index + 1])] += 1
        ended = self.ended.pop(prefix.hashes[index], None)
        if ended is not None:
            self.gaps.add(now - ended)

    def finished(self, prefix, now):
        """The reply to `prefix` ended: it may be continued from now on (a prompt too long to
        follow whole is left out: its next turn could not be told from it)."""
        if len(prefix.hashes) >= MAX_PREFIX_BLOCKS:
            return
        key = prefix.hashes[-1]
        self.ended[key] = now
        self.ended.move_to_end(key)
        if len(self.ended) > MAX_ENDED:
            self.ended.popitem(last=False)

    def chance(self, age, held_reply):
        """The chance that a cache last used `age` seconds ago (by a prompt that held a reply, or
        not) is still to be continued: of such prompts, those continued (share p), and of those,
        the ones continued later than that (share S of the gaps seen), among all not continued
        yet: p S / (1 - p + p S)."""
        sent = self.sent[held_reply]
        share = (min(1.0, self.continued[held_reply] / sent) if sent >= MIN_FOLLOW_UP_SAMPLES
                 else PRIOR_FOLLOW_UP_SHARE)
        later = (self.gaps.share_above(age) if len(self.gaps) >= MIN_FOLLOW_UP_SAMPLES
                 else float(age < PRIOR_FOLLOW_UP_S))
        still = share * later
        return still / (1 - share + still) if still else 0.0


@dataclass(slots=True)
class Node:
    """What herd knows about one Ollama machine."""

    node_id: str
    url: str
    source: str  # agent | poll | local
    interval_s: float
    hostname: str = ""
    memory: dict | None = None
    gpu: dict | None = None
    cpu_percent: float | None = None
    num_parallel: int | None = None
    memory_budget_gb: float | None = None
    default_context_length: int | None = None
    reachable: bool = False
    ollama_version: str | None = None
    ollama_error: str | None = None
    models: dict = field(default_factory=dict)  # name -> /api/tags entry
    loaded: dict = field(default_factory=dict)  # name -> /api/ps entry
    unloaded_at: dict = field(default_factory=dict)  # name -> time.monotonic() it left memory
    split_share: dict = field(default_factory=dict)  # name -> share in VRAM when /api/ps last showed it split
    in_vram: set = field(default_factory=set)  # models /api/ps has shown held whole in VRAM here
    # the KV cache per token of context, as a share of a model's weights: what /api/ps shows the
    # largest loaded model take beyond its size on disk (small models' fixed overhead would
    # overstate it); 0 until it has shown one
    kv_share: float = 0.0
    load_options: dict = field(default_factory=dict)  # name -> reload options herd loaded it with
    default_ctx: dict = field(default_factory=dict)  # name -> context it gets without num_ctx (seen)
    context_probe: set = field(default_factory=set)  # models just served without num_ctx
    guessed_ctx: int | None = None  # the default context guessed from what runs (see context_default)
    # model -> (context, monotonic time the load should be done, the context it ran with before or
    # None): herd sent a request that (re)loads the model at that context, so it runs with it from
    # then on, whatever reports made before say
    switching: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)  # model -> ModelSlots (see the prompt caches above)
    last_seen: float = 0.0  # time.time() of the last good report
    in_flight: int = 0
    running: dict = field(default_factory=dict)  # model -> Running
    started: dict = field(default_factory=dict)  # model -> time.monotonic() of the last requests started here
    # What herd measured here (see Scoring: learning): recent samples and what it routes on.
    decode_gbs: Recent = field(default_factory=Recent)  # decode speed x model size (GB/s)
    decode_gbs_alone: Recent = field(default_factory=Recent)  # the same, from requests that ran alone
    prefill_gbs: Recent = field(default_factory=Recent)  # the same for prompt processing
    model_gbs: dict = field(default_factory=dict)  # model -> Recent decode GB/s of that model alone
    ram_gbs: Recent = field(default_factory=Recent)  # how fast the part of a split model in system RAM streams
    loads: list = field(default_factory=list)  # (GB, seconds) of recent model loads
    decode_speed: float | None = None
    prefill_speed: float | None = None
    ram_speed: float | None = None
    preloading: str | None = None  # the model herd's warmer is loading here
    load_cost: tuple | None = None  # (fixed s, s per GB)
    batch_exp: float = BATCH_SLOWDOWN  # streams of one model: each at streams ^ -batch_exp of alone
    cross_exp: float = CROSS_SLOWDOWN  # models at once: each at models ^ -cross_exp of alone
    batch_samples: Recent = field(default_factory=Recent)
    cross_samples: Recent = field(default_factory=Recent)
    calibrated_at: float = -1e9  # time.monotonic() of the last calibration sent
    served: int = 0  # requests completed here
    returns: list = field(default_factory=list)  # time.time() of each return after being offline
    failures: int = 0  # consecutive failed requests
    failure_kind: str | None = None  # unreachable | error
    cooldown_until: float = 0.0
    last_failure: str | None = None

    def status(self, now):
        if now - self.last_seen > MISSED_INTERVALS_OFFLINE * self.interval_s:
            return "offline"
        return "online" if self.reachable and now >= self.cooldown_until else "degraded"

    def budget_bytes(self):
        return self.memory_budget_gb * GB if self.memory_budget_gb else None

    def memory_in_use(self):
        return sum(entry_bytes(entry) for entry in self.loaded.values())

    def model_bytes(self, model):
        """Bytes a model needs here: its loaded size if loaded, else its size on disk."""
        return entry_bytes(self.loaded.get(model) or self.models.get(model) or {})

    def weights_gb(self, model):
        """GB of weights: what a token streams through memory and a load reads from disk. The
        /api/tags size, not the loaded one, which adds the context's KV cache."""
        entry = self.models.get(model) or self.loaded.get(model) or {}
        return max((entry.get("size") or self.model_bytes(model)) / GB, 0.05)

    def fits(self, model):
        """Can this node hold the model at all (evicting others if it must)?"""
        budget = self.budget_bytes()
        return budget is None or model in self.loaded or self.model_bytes(model) <= budget

    def vram_share(self, model):
        """The share of `model` Ollama holds in VRAM here (size_vram / size in /api/ps, or when it
        last showed it split); before /api/ps has shown it, what the GPU's VRAM holds of what the
        model takes at its context (Ollama puts the rest in system RAM); or None."""
        entry = self.loaded.get(model) or {}
        vram, size = entry.get("size_vram"), entry.get("size")
        if vram is not None and size:
            return min(1.0, vram / size)
        if model in self.split_share:
            return self.split_share[model]
        if model in self.in_vram:
            return None
        total = ((self.gpu or {}).get("vram_total_gb") or 0) * GB
        if not total or self.gpu.get("unified"):  # (unified memory: the budget decides)
            return None
        weights = (self.models.get(model) or {}).get("size") or self.model_bytes(model)
        need = weights * (1 + self.kv_share * (self.running_context(model) or self.context_default(model)))
        return total / need if need > total else None

    def loading_other(self, model, now):
        """Is herd loading another model here: a request it sent that loads one and has not
        answered yet, a (re)load it expects still under way, or a preload? Ollama loads one model
        at a time: a load that starts meanwhile waits for that one, and its time says as much
        about the other load as about its own."""
        if self.preloading not in (None, model):
            return True
        if any(name != model and until > now for name, (_, until, _) in self.switching.items()):
            return True
        return any(lease.cold and not lease.answered and not lease.released
                   for name, group in self.running.items() if name != model for lease in group.unanswered)

    def loading_split(self):
        """The models herd is loading here that run split with system RAM: each fills the VRAM and
        loads alone, so every other model leaves once it is idle."""
        return {name for name in self.switching if name in self.loaded and self.split(name)}

    def split(self, model):
        """Does Ollama run `model` here partly from system RAM (GPU_RESIDENT), as /api/ps shows
        now or showed when it last had it loaded?"""
        share = self.vram_share(model)
        return share is not None and 0 < share < GPU_RESIDENT

    def gpu_share(self):
        """The share of its loaded models' bytes Ollama holds in VRAM; None when /api/ps has not
        said (nothing loaded, or only models herd noted loading itself)."""
        reported = [entry for entry in self.loaded.values() if entry.get("size_vram") is not None]
        total = sum(entry.get("size") or 0 for entry in reported)
        return min(1.0, sum(entry["size_vram"] for entry in reported) / total) if total else None

    def context_default(self, model):
        """The context `model` gets here when a request leaves num_ctx out: seen for this model,
        else reported by the agent, else a guess: the larger of the largest seen for another model
        (Ollama caps a default at the context a model was trained for, so an embedding model can
        show less) and the context most models in this node's /api/ps run with, leaving out the
        ones herd itself sent an explicit num_ctx (those show the client's context, not the default)."""
        if model in self.default_ctx:
            return self.default_ctx[model]
        if self.default_context_length:
            return self.default_context_length
        if self.guessed_ctx is None:  # worked out once per report (every decision reads it)
            seen = max(self.default_ctx.values(), default=0)
            common = most_common(e.get("context_length") for name, e in self.loaded.items()
                                 if not e.get("learned") and (self.load_options.get(name) or {}).get("num_ctx") is None)
            self.guessed_ctx = max(seen, common or 0) or DEFAULT_NUM_CTX
        return self.guessed_ctx

    def default_known(self, model):
        """Is context_default(model) more than a guess?"""
        return model in self.default_ctx or self.default_context_length is not None

    def running_context(self, model):
        """The context `model` runs with here, or None when it is not loaded: as /api/ps reports it,
        or as herd loaded it; loaded without num_ctx, the node's default, whatever herd takes that
        to be by now (a guess made at the load can be corrected by later reports)."""
        entry = self.loaded.get(model)
        if entry is None:
            return None
        if entry.get("at_default"):
            return self.context_default(model)
        return entry.get("context_length") or self.context_default(model)

    def note_loaded(self, model, context_length, options=None, at_default=False):
        """herd loaded `model` here itself (a reply or a preload): count it hot with that context
        (the default, when `at_default`) and those reload options, when given, until the next
        report says how it runs."""
        entry = self.models.get(model, {})
        self.loaded[model] = {"name": model, "size": entry.get("size", 0), "learned": True,
                              "context_length": context_length, "at_default": at_default}
        self.guessed_ctx = None
        if options is not None:
            self.load_options[model] = options

    def note_switch(self, model, ctx, options, load_s, at_default=False):
        """herd sends a request that makes Ollama load `model` here at `ctx` (or reload it there;
        `at_default`: without num_ctx, so at the node's default, of which `ctx` is herd's guess):
        from now on it runs so, and is busy loading for about `load_s` seconds."""
        held = self.loaded.get(model)
        before = held.get("context_length") if held and not held.get("at_default") else None
        entry = held or self.models.get(model) or {}
        self.loaded[model] = {"name": model, "size": entry.get("size", 0), "size_vram": entry.get("size_vram"),
                              "context_length": ctx, "learned": True, "at_default": at_default}
        self.load_options[model] = options
        self.switching[model] = (ctx, time.monotonic() + load_s, before)
        self.prompts.pop(model, None)  # a (re)load empties the slots' caches
        self.guessed_ctx = None
        if self.split(model):  # it loads alone: the idle models leave now, the busy ones when done
            for other in [name for name in self.loaded if name != model and not self.running_count(name)]:
                del self.loaded[other]
                self.unloaded_at[other] = time.monotonic()

    def slot_caches(self, model, slots):
        """The ModelSlots of `model`'s `slots` parallel slots here (empty ones when the count
        changed: a new num_parallel means Ollama started again)."""
        caches = self.prompts.get(model)
        if caches is None or caches.count != slots:
            caches = self.prompts[model] = ModelSlots(slots)
        return caches

    def take_slot(self, model, prefix, slots):
        """A request with `prefix` goes to `model` here: it takes the slot the runner would give it,
        which holds its prompt from now on. Returns (that slot, what it held before: prefix and when
        last used), or (None, None) for a prompt with nothing to cache."""
        if not prefix.hashes:
            return None, None
        caches = self.slot_caches(model, slots)
        slot, _ = choose_slot(caches, prefix)
        if slot is None:  # every slot busy: the node runs more than it reported
            return None, None
        before = (slot.prefix, slot.used)
        caches.take(slot, prefix)
        return slot, before

    # -- the requests running here --------------------------------------------------------------

    def counts(self):
        """{model: requests running} for the models running here now."""
        return {model: group.count for model, group in self.running.items() if group.count}

    def running_count(self, model):
        group = self.running.get(model)
        return group.count if group else 0

    def hold(self, lease):
        self.running.setdefault(lease.model, Running()).add(lease)
        self.in_flight += 1
        keep_recent(self.started.setdefault(lease.model, []), lease.started)

    def start_rate(self, model, now):
        """Requests for `model` started here per second, over the last TRAFFIC_WINDOW_S (or over
        the RECENT_SAMPLES last ones, when they all started in it)."""
        recent = [t for t in self.started.get(model, ()) if now - t < TRAFFIC_WINDOW_S]
        if len(recent) < RECENT_SAMPLES:
            return len(recent) / TRAFFIC_WINDOW_S
        return len(recent) / max(now - recent[0], 1.0)

    def drop(self, lease):
        group = self.running.get(lease.model)
        if group is not None and group.count:
            group.remove(lease)
            self.in_flight -= 1

    # -- reports ------------------------------------------------------------------------------

    def apply_report(self, data):
        """Take in a heartbeat or a poll (the fields that were present). What herd's own traffic
        knows better wins: a model herd is running here stays loaded whatever the report says."""
        ollama = data.get("ollama") or {}
        came_back = not self.reachable and bool(ollama.get("reachable"))
        self.reachable = bool(ollama.get("reachable"))
        self.ollama_version = ollama.get("version")
        self.ollama_error = ollama.get("error")
        for key in ("hostname", "memory", "gpu", "cpu_percent", "num_parallel", "memory_budget_gb",
                    "default_context_length"):
            if key in data:
                setattr(self, key, data[key])
        if not self.reachable:
            return
        self.models = {normalize_model(m.get("name") or m.get("model")): m
                       for m in ollama.get("models") or () if m.get("name") or m.get("model")}
        loaded = {normalize_model(m.get("name") or m.get("model")): m
                  for m in ollama.get("loaded") or () if m.get("name") or m.get("model")}
        for name, entry in loaded.items():
            if entry.get("size_vram") is not None and entry.get("size"):
                share = entry["size_vram"] / entry["size"]
                if 0 < share < GPU_RESIDENT:
                    self.split_share[name] = share
                    self.in_vram.discard(name)
                else:
                    self.split_share.pop(name, None)
                    if share >= GPU_RESIDENT:
                        self.in_vram.add(name)
        alone = any(name in self.split_share for name in loaded)  # a split model runs alone there
        sized = [(self.models[name]["size"], entry) for name, entry in loaded.items()
                 if entry.get("context_length") and (self.models.get(name) or {}).get("size")]
        if sized:
            disk, entry = max(sized, key=lambda item: item[0])
            share = (max(entry.get("size") or 0, entry.get("size_vram") or 0) / disk - 1) / entry["context_length"]
            if share > 0:
                self.kv_share = share
        now = time.monotonic()
        for name, (ctx, until, before) in list(self.switching.items()):
            shown = (loaded.get(name) or {}).get("context_length")
            if shown == ctx:
                del self.switching[name]  # the node says so too
            elif shown and self.loaded.get(name, {}).get("at_default") and shown != before:
                del self.switching[name]  # loaded without num_ctx: what it shows is the default
            elif self.running_count(name) or now < until + SWITCH_GRACE_S:
                loaded[name] = self.loaded.get(name) or loaded.get(name)  # not reported yet: herd knows better
            else:
                del self.switching[name]  # long done, and the node says otherwise: believe it
        if self.loading_split():  # it pushes the idle ones out: a report made before shows them
            loaded = {name: entry for name, entry in loaded.items()
                      if name in self.switching or self.running_count(name)}
        for name in self.loaded.keys() - loaded.keys():
            if self.running_count(name) and not alone:  # (beside a split model they wait, unloaded)
                loaded[name] = self.loaded[name]
            else:
                self.unloaded_at[name] = time.monotonic()
                self.load_options.pop(name, None)
                self.prompts.pop(name, None)
        for name, entry in loaded.items():  # a model herd loaded or served without num_ctx shows the default
            sent = self.load_options.get(name)
            probed = name in self.context_probe and not self.running_count(name)
            if ((probed or (sent is not None and sent.get("num_ctx") is None))
                    and entry.get("context_length") and not entry.get("learned")):
                self.default_ctx[name] = entry["context_length"]
            if probed:
                self.context_probe.discard(name)
        self.loaded = loaded
        self.guessed_ctx = None
        # herd's own poll reached it, or its agent saw its Ollama come back: it answers again, so
        # its rest ends now. An agent that reaches its Ollama all along does not say herd can (an
        # Ollama listening on loopback only)
        if self.failure_kind == "unreachable" and (self.source != "agent" or came_back):
            self.failures, self.failure_kind, self.cooldown_until = 0, None, 0.0


@dataclass(slots=True)
class Waiter:
    """A request in the admission queue, waiting for a slot."""

    call: Call
    models: list
    enqueued: float
    deferred: bool = False  # waiting by choice while a slot is free (see Scoring: deferring)
    cancelled: bool = False  # herd is shutting down
    event: threading.Event = field(default_factory=threading.Event)
    lease: Lease | None = None


# =============================================================================================
# Context rules: when a request makes Ollama reload a model, and how herd keeps it from doing so
# =============================================================================================
#
# Ollama reloads a loaded model when a request's num_ctx (or num_gpu, num_batch, num_thread,
# use_mmap) differs from what it runs with, and also when a request leaves num_ctx out while the
# model runs with a context other than the node's default. /v1 requests cannot set options at
# all. Under `strip` herd rewrites a native request so that it runs with what is loaded, unless it
# needs a larger context; `warn` only logs; `passthrough` does nothing.

def context_number(value):
    """num_ctx as a whole number, whether the client wrote 8192 or 8192.0; None when absent."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    return None


def sent_num_ctx(call):
    return call.options().get("num_ctx")


def needs_reload(call, loaded_ctx, default_ctx, load_options, policy):
    """Would this request make Ollama reload a model that runs with `loaded_ctx`?"""
    if call.api == "openai":  # /v1 cannot set options: it runs with the defaults
        return loaded_ctx != default_ctx or any(load_options.get(k) is not None for k in RELOAD_OPTIONS)
    options = call.options()
    asked = context_number(options.get("num_ctx"))
    if policy == "strip":  # herd rewrites whatever would reload, except a context that is too small
        return asked is not None and asked > loaded_ctx
    wanted = asked if asked is not None else default_ctx
    return wanted != loaded_ctx or any(options.get(k) != load_options.get(k) for k in RELOAD_OPTIONS)


def protect_context(call, lease, policy):
    """Keep a native request from reloading the model it is sent to (strip), or say it would (warn).
    Edits call.body and notes what it changed."""
    if policy == "passthrough" or call.api == "openai" or lease.loaded_ctx is None:
        return
    original = call.options()
    options = dict(original)
    loaded, default = lease.loaded_ctx, lease.default_ctx
    asked = context_number(options.get("num_ctx"))
    changes = []
    if asked is not None and asked > loaded:
        changes.append(f"num_ctx {asked} > loaded {loaded}: passed through (reload)")
    elif asked is not None and loaded == default and not lease.pin_ctx:
        del options["num_ctx"]
        changes.append(f"num_ctx {asked} stripped (loaded {loaded})")
    elif asked is not None and asked != loaded:
        options["num_ctx"] = loaded
        changes.append(f"num_ctx {asked} -> {loaded} (loaded)")
    elif asked is None and loaded != default:
        options["num_ctx"] = loaded
        changes.append(f"num_ctx set to loaded {loaded}")
    elif asked is None and lease.pin_ctx:
        options["num_ctx"] = loaded  # the node's default is a guess: name what runs (not a change)
    for key in RELOAD_OPTIONS:
        if options.get(key) != lease.load_options.get(key):
            if key in lease.load_options:
                changes.append(f"{key} {options.get(key)} -> {lease.load_options[key]} (loaded)")
                options[key] = lease.load_options[key]
            else:
                changes.append(f"{key} {options.pop(key)} stripped")
    if policy == "warn":
        if changes:
            log.warning("request %s would reload %s on %s: %s", call.request_id, lease.model, lease.node_id,
                        "; ".join(changes))
            call.note({"context": "warn: " + "; ".join(changes)})
        return
    if options != original:
        call.body["options"] = options
        if original or b'"options"' in call.raw:
            call.options_edited = True
        else:
            call.added_options = True
    if changes:
        log.info("request %s to %s on %s: %s", call.request_id, lease.model, lease.node_id, "; ".join(changes))
        call.note({"context": "; ".join(changes)})


# =============================================================================================
# Scoring: eliminate, estimate where the time goes, then seven signals. Every formula lives here.
# =============================================================================================
#
# These are functions of the state they read (nodes, a call, a few numbers); the Fleet calls them
# under its lock. Elimination (eligibility): offline or degraded nodes, nodes without the model,
# nodes whose memory budget is smaller than the model.
#
# Each remaining node gets an expected completion time for this request, in seconds, built from
# what herd measured on its own traffic (Ollama reports load, prompt and eval durations with
# every reply; speeds are kept per node as GB of weights per second, so one model's speed
# predicts another's, and per model once it has replies of its own there, since a model split
# between VRAM and system RAM or a mixture of experts keeps its own pace). A node herd has not
# measured yet is timed once when it joins (Warming: calibration); until then it decodes like the
# slowest measured node and loads like the median one, or, when /api/ps shows Ollama keeps
# models in system RAM (size_vram < size), at the node's RAM speed for that share (learnt from
# split models' replies, else RAM_VS_VRAM of the VRAM's). A model /api/ps has not
# shown on a node yet is taken to run split when its weights and KV cache (learnt per node from
# what loaded models take beyond their size on disk) exceed the VRAM the agent reports: it then
# loads alone, pushing the others out, and streams the rest at the node's RAM speed.
#   wait       until a slot for the model frees there (herd never exceeds num_parallel), counting
#              the requests already queued for the model
#              (and, before a load or reload, until the busy models it pushes out are done)
#   load       a cold load or a context reload: the node's fixed start-up + weights GB x its
#              seconds per GB (both learned from its loads); half when the model left memory in
#              the last 10 minutes (page cache)
#   service    prompt tokens (less what the slot the runner would give it holds) / prefill speed
#              + expected output tokens / decode speed, where speed = the node's GB/s (25th
#              percentile: its p75 time per token) / weights GB / sharing; sharing = (streams
#              of this model) ^ 0.3 x (models running): parallel slots of one model batch well,
#              while different models take turns at the memory bandwidth. It is integrated over
#              time: each model running there speeds this one up when it ends
#   slowdown   what this request adds to the streams already running there: they slow down too,
#              for as long as the two overlap
#   eviction   the load time of hot models a load or reload would push out of memory (beyond the
#              node's budget; without one, the models split with system RAM), half of it; and the
#              prompt evaluation a conversation loses when this request takes the slot its cache
#              is in, times the chance that it comes back (FollowUps)
#   risk       a node that failed recently may fail again: failures x 25% x its time
# Deferring: when waiting for a node's other models to finish and then running alone there is
# sooner (counting the slowdown avoided) than sharing it now, the wait is the estimate and, if
# that node wins, the request waits in herd's queue for it (two models at once finish both late).
# The seven signals express these seconds as points at one exchange rate per decision (chosen so
# no signal leaves its range), so the highest total is the soonest expected completion:
#
# signal              range     points
# thermal             0..+50    50 - rate x load (50 when the model is hot and will not reload)
# memory_fit          0..+20    20 - rate x eviction
# queue_depth         -30..0    -rate x wait
# latency_history     -25..0    -rate x (service here - service on the fastest candidate)
# role_affinity       0..+15    15 - rate x slowdown (small models leave the busy big machine free)
# availability_trend  0..+10    10 - rate x risk
# context_fit         0..+15    15 - rate x the part of the load that is a context reload
#
# Ties (scores closer than 10 ms or 2% of the time, more than an estimate can tell apart): fewest
# requests in flight on the whole node, then random, so equal nodes share the load.

CHARS_PER_TOKEN = 4  # rough size of a token in English text
TIE_S, TIE_SHARE = 0.01, 0.02  # expected times closer than 10 ms or 2% are a tie (see pick)
LOAD_FIXED_S = 1.0  # starting a runner, before the weights stream in (at most; learned per node)
HOT_LOAD_S = 0.05  # a load_duration below this is Ollama finding the model already loaded
PRIOR_DECODE_GBS = 300.0  # a node herd has not measured yet: a mid-range GPU or Apple chip
# the part of a model Ollama keeps in system RAM streams about a tenth as fast as the GPU's VRAM
# (dual-channel DDR4/DDR5 at 40-80 GB/s against 400-1000 GB/s), until a split model's replies say
RAM_VS_VRAM = 0.1
GPU_RESIDENT = 0.9  # a model with less of it in VRAM is split with system RAM: it runs at its own pace
MODEL_SAMPLES = 2  # replies of one model on a node before its own speed there replaces the node's
PRIOR_PREFILL_RATIO = 20.0  # prompt tokens go this many times faster than generated ones
PRIOR_LOAD_S_PER_GB = 0.5  # an NVMe SSD reading about 2 GB/s
PRIOR_OUTPUT_TOKENS = 250  # a chat reply of a few paragraphs
PRIORS_EVERY_S = 1.0  # how often the priors for unmeasured nodes follow the measured ones as they move
TRAFFIC_WINDOW_S = 60.0  # a node's recent rate of requests per model is counted over this window
RECENT_UNLOAD_S = 600.0  # a model unloaded this recently is likely still in the OS page cache...
PAGE_CACHE_DISCOUNT = 0.5  # ...and reloads in about half the time
FAILURE_RISK = 0.25  # each recent failure of a node: this share of its time again, as risk
SIGNAL_RANGES = {"thermal": 50.0, "memory_fit": 20.0, "queue_depth": 30.0, "latency_history": 25.0,
                 "role_affinity": 15.0, "availability_trend": 10.0, "context_fit": 15.0}
# which estimate each signal prices, and whether it is a bonus that the cost reduces (+) or a penalty (-)
SIGNAL_SECONDS = {"thermal": ("cold_load", +1), "memory_fit": ("eviction", +1), "queue_depth": ("wait", -1),
                  "latency_history": ("slower_by", -1), "role_affinity": ("slowdown", +1),
                  "availability_trend": ("risk", +1), "context_fit": ("reload", +1)}


def slots(node, parallel):
    """Requests the node runs at once per model: what it reported, else herd's --parallel."""
    return max(1, node.num_parallel or parallel)


def company(counts, model, extra=0):
    """(streams of `model`, models running) beside `counts` ({model: streams}) with `extra` more."""
    same = counts.get(model, 0) + extra
    models = sum(1 for n in counts.values() if n) + (1 if extra and not counts.get(model) else 0)
    return max(1, same), max(1, models)


def sharing(counts, model, extra=0, batch=BATCH_SLOWDOWN, cross=CROSS_SLOWDOWN):
    """How much slower than alone a stream of `model` runs beside `counts` ({model: streams}),
    with `extra` more streams of its own: streams ^ batch x models ^ cross."""
    same, models = company(counts, model, extra)
    return same ** batch * models ** cross


def shared_run(node, model, work, start, now):
    """(seconds, slowdown): how long a request needing `work` seconds alone takes on `node` when
    it starts in `start` seconds, beside the requests running there that have not ended by then
    (each model's group is taken to end at its mean remaining time, stretched by the share this
    request takes), and the seconds it adds to theirs while they overlap. The sharing is the
    node's (streams ^ batch x models ^ cross, see `sharing`), worked out incrementally."""
    if not node.in_flight:
        return work, 0.0
    groups, mine_running = [], 0  # (expected end without this request, model, its streams)
    for other, group in node.running.items():
        if group.count > 0:
            left = group.mean_remaining(now)
            if left > start:
                groups.append((left, other, group.count))
                if other == model:
                    mine_running = group.count
    if not groups:
        return work, 0.0
    batch, cross = node.batch_exp, node.cross_exp
    models = len(groups)
    more_models = ((models + 1) / models) ** cross if not mine_running else 1.0  # this request joining them
    ends = []
    for left, other, count in groups:
        stretch = more_models * ((count + 1) / count) ** batch if other == model else more_models
        ends.append((start + (left - start) * stretch, other, count, stretch))
    ends.sort()
    t, todo = start, work
    same, running_models = mine_running + 1, models + (not mine_running)
    for end, other, count, _ in ends:
        pace = 1 / (same ** batch * running_models ** cross)
        if todo <= (end - t) * pace:
            break
        todo -= (end - t) * pace
        t = end
        if other == model:
            same = 1  # its own model's other streams are done
        else:
            running_models -= 1
    finish = t + todo * same ** batch * running_models ** cross
    slowdown = 0.0
    for end, _, count, stretch in ends:
        if stretch != 1.0:  # a group this request does not slow (its own model's, when it runs already)
            slowdown += count * (min(end, finish) - start) * (1 - 1 / stretch)
    return finish - start, slowdown


def load_costs(loads):
    """(fixed s, s per GB) of a node's model loads, from its (GB, seconds) samples, or None: the
    fixed part (starting a runner) is at most half the quickest load; the s per GB the median over
    the gigabytes loaded, so that a 1 GB embedding model's load, mostly start-up, does not price a
    20 GB model's at many times what it takes, and one load slowed by something else does not either."""
    if not loads:
        return None
    fixed = min(LOAD_FIXED_S, 0.5 * min(seconds for _, seconds in loads))
    per_gb = sorted(((seconds - fixed) / gb, gb) for gb, seconds in loads)
    half, counted = sum(gb for _, gb in per_gb) / 2, 0.0
    for (cost, gb), (next_cost, _) in zip(per_gb, per_gb[1:]):
        counted += gb
        if counted > half:
            return fixed, cost
        if counted == half:  # the median falls between two costs
            return fixed, (cost + next_cost) / 2
    return fixed, per_gb[-1][0]


@dataclass(frozen=True)
class Priors:
    """What to assume for a node herd has not measured yet."""

    decode_gbs: float = PRIOR_DECODE_GBS
    load_fixed_s: float = LOAD_FIXED_S
    load_s_per_gb: float = PRIOR_LOAD_S_PER_GB


def unmeasured_priors(nodes):
    """Priors for unmeasured nodes, else the fixed priors above: decoding like the slowest
    measured node (a guess that is too fast sends it requests a known node would serve sooner);
    loading like the median measured node (a guess that is too slow keeps queueing requests on a
    busy node where the model is hot, when a load elsewhere would finish sooner)."""
    speeds = [n.decode_speed for n in nodes if n.decode_speed]
    loads = [n.load_cost for n in nodes if n.load_cost]
    if not speeds and not loads:
        return Priors()
    return Priors(min(speeds) if speeds else PRIOR_DECODE_GBS,
                  statistics.median(c[0] for c in loads) if loads else LOAD_FIXED_S,
                  statistics.median(c[1] for c in loads) if loads else PRIOR_LOAD_S_PER_GB)


def split_speed(node, share, gpu_gbs):
    """Decode GB/s of a model with `share` of it in VRAM streaming at `gpu_gbs`, the rest in
    system RAM at the speed learnt there (learn_ram_speed), else RAM_VS_VRAM of the VRAM's."""
    return 1 / (share / gpu_gbs + (1 - share) / (node.ram_speed or gpu_gbs * RAM_VS_VRAM))


def offload_prior(node, gpu_gbs):
    """Decode GB/s to assume for an unmeasured node from where Ollama put its loaded models: the
    share in VRAM (size_vram / size in /api/ps) streams at GPU speed, the rest at RAM speed."""
    share = node.gpu_share()
    if share is None or share >= 0.99:
        return gpu_gbs
    return split_speed(node, share, gpu_gbs)


def model_speed(node, model, priors):
    """Decode GB/s of `model` on `node`: measured for this model once it has MODEL_SAMPLES replies
    (a model split between VRAM and system RAM, or a mixture of experts, runs at its own pace),
    else the node's speed, slowed for the share of the model /api/ps shows in system RAM."""
    own = node.model_gbs.get(model)
    if own is not None and len(own) >= MODEL_SAMPLES:
        return own.quantile(0.25)
    if not node.decode_speed:
        return offload_prior(node, priors.decode_gbs)
    if node.split(model):
        return split_speed(node, node.vram_share(model), node.decode_speed)
    return node.decode_speed


def expected_output(call, usual):
    """Tokens the reply will have: the client's cap when it is below twice what the model
    usually says (`usual`)."""
    options = call.options()
    cap = call.body.get("max_tokens") or call.body.get("max_completion_tokens") or options.get("num_predict")
    if isinstance(cap, int) and cap > 0:
        return min(cap, 2 * usual)
    return usual


def pushed_out(node, model):
    """The other models a load (or reload) of `model` pushes out of memory on `node`, smallest
    first: all of them when it runs split with system RAM there (it fills the VRAM, so Ollama
    loads it alone), the split ones (for the same reason), and enough others to fit the node's
    memory budget. A reload frees the model's own memory first."""
    others = sorted((name for name in node.loaded if name != model), key=lambda name: entry_bytes(node.loaded[name]))
    if node.split(model):
        return others
    out = [name for name in others if node.split(name)]
    budget = node.budget_bytes()
    if budget is None:
        return out
    free, need = budget - node.memory_in_use(), node.model_bytes(model)
    if model in node.loaded:
        free += need
    for name in others:
        if free >= need:
            break
        free += entry_bytes(node.loaded[name])
        if name not in out:
            out.append(name)
    return out


def estimate(node, model, call, *, slots, policy, usual_output, ahead, priors, admit, now, follow_ups=None):
    """Seconds this request would spend on `node`, by cause (see the table above).

    slots: the node's parallel requests per model; policy: context protection; usual_output:
    tokens the model's replies usually have; ahead: requests queued before this one for the
    model; priors: for what the node has not measured yet; admit: the request takes a slot (not
    a read); now: time.monotonic(); follow_ups: how often conversations come back (FollowUps),
    to price a prompt cache this request would overwrite (None: not priced)."""
    size_gb = max(node.model_bytes(model) / GB, 0.05)  # memory it takes
    weights = node.weights_gb(model)
    decode_gbs = model_speed(node, model, priors)
    prefill_gbs = node.prefill_speed or decode_gbs * PRIOR_PREFILL_RATIO
    load_fixed, load_per_gb = node.load_cost or (priors.load_fixed_s, priors.load_s_per_gb)
    mine = node.running.get(model) or Running()

    loaded = node.loaded.get(model)
    load = reload = blocked = 0.0
    if loaded is None:
        load = load_fixed + weights * load_per_gb
        if now - node.unloaded_at.get(model, -1e9) < RECENT_UNLOAD_S:
            load *= PAGE_CACHE_DISCOUNT
    else:
        default_ctx = node.context_default(model)
        ctx = node.running_context(model)
        if needs_reload(call, ctx, default_ctx, node.load_options.get(model, {}), policy):
            reload = mine.longest_remaining(now) + load_fixed + weights * load_per_gb  # drain first
            # the model's next requests here wait through the drain and the reload too: as many
            # as arrive in that time, each half of it on average
            blocked = node.start_rate(model, now) * reload * reload / 2

    wait = 0.0
    switch = node.switching.get(model)
    if switch is not None and switch[1] > now:  # a (re)load herd started is still under way
        wait = switch[1] - now
    if mine.count:  # one it keeps waiting long past its estimate: this one would wait behind it
        wait = max(wait, mine.stalled(now))
    if admit and mine.count >= slots:  # the slots free as running requests end, queued ones first
        if ahead < mine.count:
            wait = max(wait, mine.nth_remaining(ahead, now))
        else:
            per_slot = mine.eta_sum / mine.count or 1.0
            wait = max(wait, mine.nth_remaining(mine.count - 1, now) + (ahead - mine.count + 1) / slots * per_slot)

    # a load makes room as a cold one does, a context reload too: Ollama waits for the busy models
    # it pushes out (a model split with system RAM fills the VRAM: every load pushes it out)
    eviction = evicting = 0.0
    for name in pushed_out(node, model) if loaded is None or reload else ():
        if node.running_count(name):
            evicting = max(evicting, node.running[name].longest_remaining(now))
        eviction += 0.5 * (load_fixed + entry_bytes(node.loaded[name]) / GB * load_per_gb)
    if reload:  # it drains its own requests meanwhile: the longer of the two comes first
        drain = mine.longest_remaining(now)
        reload -= min(drain, evicting)
    wait = max(wait, evicting)

    # what the slot the runner would give it already holds of the prompt is not evaluated again;
    # what that slot held beyond it is lost to the conversation it belonged to, should it come back
    held = displaced = 0
    caches = node.prompts.get(model) if loaded is not None and not reload and call.prefix.hashes else None
    if caches and caches.count == slots:
        slot, blocks = choose_slot(caches, call.prefix)
        if slot is None:  # it waits for a slot; as a guess, the one holding the most of its prompt
            blocks = caches.longest(call.prefix.hashes, caches.held_blocks)
        elif follow_ups is not None and slot.used:
            lost = overwritten_chars(caches, slot, blocks) / CHARS_PER_TOKEN * weights / prefill_gbs
            displaced = lost * follow_ups.chance(now - slot.used, any(slot.prefix.replies))
        held = call.prefix.ends[blocks - 1] if blocks else 0
    cached_tokens = held / CHARS_PER_TOKEN
    prompt_s = max(0.0, call.prompt_chars / CHARS_PER_TOKEN - cached_tokens) * weights / prefill_gbs
    eviction += displaced + blocked
    work = prompt_s  # seconds alone on the node
    if "embed" not in call.endpoint:
        work += expected_output(call, usual_output) * weights / decode_gbs
    service, slowdown = shared_run(node, model, work, wait + load + reload, now)
    # Models running side by side take turns at the memory bandwidth, so both finish late. When
    # it is sooner overall, wait in herd's queue for the node's other models to finish instead
    # (the choice is made again whenever a request ends and a few times a second).
    # A request defers for at most as long as it would take alone, so a steady stream of other
    # models cannot hold it back for ever.
    defer, others = False, None
    if admit and not load and not reload:  # when each of the node's other models is done
        others = [group.longest_remaining(now) for other, group in node.running.items()
                  if other != model and group.count]
    if others:
        free_in = max(others)
        alone = work * (mine.count + 1) ** node.batch_exp  # sharing() with its own model's streams only
        waited = time.perf_counter() - call.started
        if waited < alone and max(wait, free_in) + alone < wait + service + slowdown:
            wait, service, slowdown, defer = max(wait, free_in), alone, 0.0, True

    eta = wait + load + reload + service
    risk = min(1.0, FAILURE_RISK * node.failures) * eta
    return {"wait": wait, "cold_load": load + reload, "reload": reload, "service": service,
            "slowdown": slowdown, "eviction": eviction, "risk": risk, "eta": eta, "defer": defer,
            "prompt": prompt_s, "cached_tokens": cached_tokens, "displaced": displaced}


def exchange_rate(causes):
    """Points per second for one decision: as fine as the signals' ranges allow (no signal leaves
    its range for any candidate). `causes`: each candidate's seconds by cause, slower_by set."""
    rate = 1000.0
    for name, (cause, _) in SIGNAL_SECONDS.items():
        worst = max(e[cause] for e in causes) if len(causes) > 1 else causes[0][cause]
        if worst > 0:
            rate = min(rate, SIGNAL_RANGES[name] / worst)
    return rate


def score_candidates(estimates):
    """[(node, seconds by cause)] -> ([(node, total points, breakdown, eta)], the exchange rate
    they were scored at)."""
    causes = [e for _, e in estimates]
    fastest = min(e["service"] for e in causes)
    for e in causes:
        e["slower_by"] = e["service"] - fastest
    rate = exchange_rate(causes)
    scored = []
    for node, e in estimates:
        breakdown = {name: (SIGNAL_RANGES[name] - rate * e[cause] if sign > 0 else 0.0 - rate * e[cause])
                     for name, (cause, sign) in SIGNAL_SECONDS.items()}
        scored.append((node, sum(breakdown.values()), breakdown, e["eta"]))
    return scored, rate


def pick(scored, rate):
    """The index of the best scored candidate. Scores closer than TIE_S seconds (or TIE_SHARE of the
    time) are estimates too close to tell apart: those go to the node with the fewest requests in
    flight, then at random, so that equal nodes share the load."""
    best = max(range(len(scored)), key=lambda i: scored[i][1])
    if len(scored) == 1:
        return best
    margin = rate * max(TIE_S, TIE_SHARE * scored[best][3])
    ties = [i for i in range(len(scored)) if scored[i][1] >= scored[best][1] - margin]
    return max(ties, key=lambda i: (-scored[i][0].in_flight, random.random()))


# -- choosing ---------------------------------------------------------------------------------

MODELS_LISTED = 20  # models a "not on any node" error names (the message and its trace row stay short)


def eligibility(node, model, now):
    """'ok' (may serve now), 'failing' (has the model but is resting or unreachable), or None."""
    if model not in node.models or not node.fits(model):
        return None
    status = node.status(now)
    if status == "online":
        return "ok"
    return "failing" if status == "degraded" else None


def why_excluded(node, model, now):
    """Why `node` cannot take a request for `model` now, in a few words (for the trace)."""
    if model not in node.models:
        return f"does not have {model}"
    if not node.fits(model):
        return f"{model} does not fit its {node.memory_budget_gb:g} GB"
    status = node.status(now)
    if status == "offline":
        return "offline (no report for 3 intervals)"
    if not node.reachable:
        return f"Ollama unreachable: {node.ollama_error or 'no answer'}"
    return f"resting after {node.failures} failure(s): {node.last_failure or ''}".strip()


def model_spelling(nodes, name, now):
    """`name` as the nodes spell it: Ollama matches model names whatever their case, so `Llama3.2`
    is the `llama3.2:latest` a node has (unchanged when no node has it). The nodes that can serve
    now are asked first: an offline or resting one's spelling would leave the request none or make
    it wait."""
    folded = name.casefold()
    nodes = list(nodes)
    for group in ([node for node in nodes if node.status(now) == "online"], nodes):
        if any(name in node.models for node in group):
            return name
        spelled = next((installed for node in group for installed in node.models
                        if installed.casefold() == folded), None)
        if spelled is not None:
            return spelled
    return name


def servable_models(nodes, call, now):
    """The asked model and its fallbacks that some node could serve; raises RoutingError with
    what the client should hear when none can."""
    models = [m for m in call.candidate_models() if any(eligibility(n, m, now) for n in nodes)]
    if models:
        return models
    online = [n for n in nodes if n.status(now) != "offline" and n.reachable]
    if not online:
        if nodes:
            known = "; ".join(f"{n.node_id}: {n.ollama_error or n.status(now)}"
                              for n in sorted(nodes, key=lambda n: n.node_id))
            raise RoutingError(503, f"no node is online ({known}); check that Ollama runs "
                               "on them and that herd-node reports", "no_nodes", retry_after=5)
        raise RoutingError(503, "no node is online; start herd-node beside each Ollama or pass "
                           "--node http://host:11434 to herd", "no_nodes", retry_after=5)
    if any(call.model in n.models for n in online):
        raise RoutingError(507, f"model {call.model} does not fit in the memory of any node that "
                           "has it", "model_too_large")
    offline_with = sorted(n.node_id for n in nodes if call.model in n.models)
    if offline_with:
        raise RoutingError(503, f"model {call.model} is only on nodes that are offline now "
                           f"({', '.join(offline_with)})", "nodes_offline", retry_after=5)
    installed = sorted({m for n in online for m in n.models})
    listed = ", ".join(installed[:MODELS_LISTED]) or "no models"
    if len(installed) > MODELS_LISTED:
        listed += f" and {len(installed) - MODELS_LISTED} more (GET /api/tags lists them)"
    raise RoutingError(404, f"model {call.model} is not on any node; the fleet has: {listed}. Pull it "
                       f"with `ollama pull {call.model}` on a node", "model_not_found")


def estimate_all(nodes, model, call, *, parallel, policy, usual_output, ahead, priors, admit, now, follow_ups):
    """[(node, estimate)] for each of `nodes` (healthy ones with `model`); see `estimate`."""
    usual = usual_output.get(model, PRIOR_OUTPUT_TOKENS)
    return [(node, estimate(node, model, call, slots=slots(node, parallel), policy=policy, usual_output=usual,
                            ahead=ahead, priors=priors, admit=admit, now=now, follow_ups=follow_ups))
            for node in nodes]


def choose(nodes, call, models, *, parallel, policy, usual_output, queued, admit=True, priors=None,
           follow_ups=None):
    """(best slot, None) or (None, why to wait: 'busy' | 'defer' | 'failing').

    Every healthy node with the model is scored by its expected completion time, busy ones
    included (with the wait for a slot). When the best is busy the request waits for it
    (late binding re-picks on every freed slot). Models are tried in order; a model whose
    nodes are all failing gives way to the next, and is waited for only when none is healthy.
    `queued` counts, per model, the requests queued before this one; `usual_output` the tokens
    each model's replies usually have; `priors` (else worked out from `nodes`) stand in for what a
    node has not measured yet; `follow_ups` (FollowUps) how often conversations come back.
    """
    now, now_mono = time.time(), time.monotonic()
    failing = False
    for model in models:
        healthy, excluded = [], []
        for node in nodes:
            state = eligibility(node, model, now)
            if state == "ok":
                healthy.append(node)
            else:
                excluded.append(node)
                failing = failing or state == "failing"
        if not healthy:
            continue
        priors = priors or unmeasured_priors(nodes)
        estimates = estimate_all(healthy, model, call, parallel=parallel, policy=policy, usual_output=usual_output,
                                 ahead=queued.get(model, 0), priors=priors, admit=admit, now=now_mono,
                                 follow_ups=follow_ups if admit else None)
        scored, rate = score_candidates(estimates)
        best = pick(scored, rate)
        node, total, breakdown, eta = scored[best]
        chosen = estimates[best][1]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s %s -> %s; %s", call.request_id, model, node.node_id, "; ".join(
                f"{n.node_id} eta {e['eta']:.2f} s (" + " ".join(f"{k} {v:.2f}" for k, v in e.items()
                                                      if v and k != "eta") + ")" for n, e in estimates))
        if admit and node.running_count(model) >= slots(node, parallel):
            return None, "busy"  # the best node is busy: wait for it rather than settle
        if admit and chosen["defer"]:
            return None, "defer"  # the best is to let the node's other models finish first
        loaded = node.loaded.get(model)
        default_ctx = node.context_default(model)
        decision = {"model": model, "chosen": node.node_id,
                    "candidates": [(n.node_id, e, b, t) for (n, e), (_, t, b, _) in zip(estimates, scored)],
                    "excluded": [(n.node_id, why_excluded(n, model, now)) for n in excluded]}
        return Lease(node_id=node.node_id, url=node.url, model=model, score=round(total, 2),
                     breakdown=breakdown, decision=decision, held=admit, eta_s=eta, cold=chosen["cold_load"] > 0,
                     reload=chosen["reload"] > 0, load_s=chosen["cold_load"], prompt_s=chosen["prompt"],
                     timed_alone=chosen["cold_load"] > 0 and not chosen["wait"] and not node.loading_other(model, now_mono),
                     loaded_ctx=node.running_context(model),
                     default_ctx=default_ctx,
                     pin_ctx=bool(loaded and loaded.get("context_length") and not loaded.get("learned"))
                     and not node.default_known(model),
                     load_options=dict(node.load_options.get(model, {}))), None
    return None, "failing" if failing else "busy"


# -- learning: each reply tells herd how fast its node is ---------------------------------------

def record_speeds(node, model, size_gb, timings, shared, alone):
    """Fold one reply's timings into the node's speeds: decode and prefill GB/s, corrected by
    the `shared` slowdown it ran under; a reply that ran `alone` from start to end is also a clean
    decode sample. The model's own speed there learns from every reply; the node's only from
    models held in VRAM (one split with system RAM says nothing of the others). Returns the decode
    speed as measured, or None without eval timings."""
    speed = None
    if timings.get("eval_count") and timings.get("eval_s"):
        speed = timings["eval_count"] / timings["eval_s"] * size_gb
        node.model_gbs.setdefault(model, Recent()).add(speed * shared)
        if node.split(model):
            learn_ram_speed(node, node.vram_share(model), speed * shared)
            return speed
        if alone:
            node.decode_gbs_alone.add(speed)
        node.decode_gbs.add(speed * shared)
        # route on clean samples once there are a few: corrected shared ones overstate a busy node
        clean = node.decode_gbs_alone if len(node.decode_gbs_alone) >= 3 else node.decode_gbs
        node.decode_speed = clean.quantile(0.25)  # the p75 time per token: a cautious speed
    if (timings.get("prompt_count") or 0) >= 32 and timings.get("prompt_s"):
        node.prefill_gbs.add(timings["prompt_count"] / timings["prompt_s"] * size_gb * shared)
        node.prefill_speed = node.prefill_gbs.quantile(0.25)
    return speed


def learn_ram_speed(node, share, gbs):
    """A model with `share` of it in VRAM decoded at `gbs`: what its part in system RAM took is
    its time per GB less the VRAM part's at the node's speed, a sample of the RAM's speed. Only
    when the RAM part is at least a quarter of the time (else the difference is mostly the error
    in the node's speed), and never faster than the VRAM."""
    if not node.decode_speed:
        return
    ram_time = 1 / gbs - share / node.decode_speed  # seconds per GB of weights spent in RAM
    if ram_time >= 0.25 / gbs:
        node.ram_gbs.add(min(node.decode_speed, (1 - share) / ram_time))
        node.ram_speed = node.ram_gbs.quantile(0.25)


def record_load(node, size_gb, seconds):
    """A model load of `size_gb` took `seconds` on this node (timed by Ollama or by herd)."""
    keep_recent(node.loads, (size_gb, seconds))
    node.load_cost = load_costs(node.loads)


def learn_sharing(node, speed, same, models):
    """How much a reply that ran beside others was slowed, against the node's speed alone: with
    only its own model running, a sample of the batching exponent (slowdown = streams ^ b); with
    other models, of the cross-model one (slowdown = streams ^ b x models ^ c)."""
    if len(node.decode_gbs_alone) < SHARING_SAMPLES:
        return  # no clean speed alone to compare with yet
    slowdown = max(1.0, node.decode_gbs_alone.quantile(0.5) / speed)
    if models < 1.25 and same >= 1.5:
        node.batch_samples.add(min(1.0, math.log(slowdown) / math.log(same)))
        if len(node.batch_samples) >= SHARING_SAMPLES:
            node.batch_exp = node.batch_samples.quantile(0.5)
    elif models >= 1.5:
        node.cross_samples.add(min(2.0, math.log(max(1.0, slowdown / same ** node.batch_exp)) / math.log(models)))
        if len(node.cross_samples) >= SHARING_SAMPLES:
            node.cross_exp = node.cross_samples.quantile(0.5)


def learn_from_reply(node, lease, timings):
    """What one served request teaches about its node: speeds, undoing the sharing it ran under
    (the mean of the company it met at its start and at its end); how that sharing slowed it
    (learn_sharing); and the load time when it was cold and nothing held the load up (a reload
    that waited for its model's running requests there to end: less that wait, as herd saw them end)."""
    size_gb = node.weights_gb(lease.model)
    (same0, models0), (same1, models1) = lease.company_at_start, company(node.counts(), lease.model)
    same, models = math.sqrt(same0 * same1), math.sqrt(models0 * models1)
    alone = same0 == same1 == models0 == models1 == 1
    speed = record_speeds(node, lease.model, size_gb, timings, shared=same ** node.batch_exp * models ** node.cross_exp,
                          alone=alone)
    if speed and not alone and not node.split(lease.model):
        learn_sharing(node, speed, same, models)
    drain = 0.0  # a reload waits for its model's running requests there (herd stamps each end)
    if lease.drain:
        ends = [other.ended for other in lease.drain]
        drain = None if None in ends else max(0.0, max(ends) - lease.started)
    load_s = timings.get("load_s")
    if drain is None:
        load_s = None  # one of them never ended as herd saw it: the load's part is unknown
    elif load_s is not None:
        load_s -= drain  # Ollama's load time includes the drain
    elif timings.get("first_byte_s") is not None:
        # an OpenAI stream does not say how long the load took: its first byte came after the
        # drain, the load and the prompt's evaluation; taken as a load when that is most of what
        # followed the drain (else it was hot after all, or the prompt took longer than expected)
        first_byte = timings["first_byte_s"] - drain
        load_s = first_byte - lease.prompt_s if lease.prompt_s < first_byte / 2 else None
    if lease.cold and lease.timed_alone and (load_s or 0) > HOT_LOAD_S:
        record_load(node, size_gb, load_s)


# =============================================================================================
# Warming: time new nodes, load a model in demand on a node that has room for it
# =============================================================================================
#
# Three jobs keep routing informed ahead of traffic (the third, restoring a node's default
# context, is described before `restorable`). Calibration: a node herd has no speed for yet
# gets one short generation on its smallest hot chat model while it is idle, so the first real
# requests are routed on a measured speed rather than a guess. Preloading: a model that traffic
# keeps asking for is loaded onto a faster node with free memory (no eviction), so the next
# requests find it hot there. Ollama loads a model, and does nothing else, on a /api/generate
# with no prompt. The plans are functions of the fleet's state (the Fleet calls them under its
# lock); the Warmer thread carries them out.

WARMER_EVERY_S = 0.5  # how often the warmer looks for a node to calibrate, a model to preload or to restore
PRELOAD_WINDOW_S = 60.0  # demand is counted over this window
PRELOAD_MIN_REQUESTS = 2  # the second request in the window is the first sign of demand
PRELOAD_FASTER_BY = 1.15  # the node must be this much faster than where the model is hot
PRELOAD_HEADROOM = 0.15  # free memory beyond the model, for its context
PRELOAD_SPARE = 0.25  # a second home for a model hot on one node only keeps this share of memory free
CALIBRATE_RETRY_S = 60.0  # a node still unmeasured after a calibration is tried again after this
CALIBRATION_TOKENS = 32
CALIBRATION_PROMPT = ("herd is timing this machine so it can route requests to it well. "
                      "Please answer with a short list of animals that live in the sea.") * 2


def plan_calibration(nodes, now, now_mono):
    """(node, [(model, the options it runs with)] hot there, smallest first) for an online, idle
    node herd has no decode speed for and has not tried in CALIBRATE_RETRY_S; else None. Only
    models whose running context /api/ps reports are listed: any other context would reload them."""
    for node in nodes:
        if (node.decode_gbs or node.in_flight or not node.loaded or node.status(now) != "online"
                or node.preloading or now_mono - node.calibrated_at < CALIBRATE_RETRY_S):
            continue
        hot = sorted((item for item in node.loaded.items() if item[1].get("context_length")
                      and not item[1].get("at_default")),
                     key=lambda item: entry_bytes(item[1]))
        return node, [(name, dict({k: v for k, v in node.load_options.get(name, {}).items()
                                   if k in RELOAD_OPTIONS and v is not None},
                                  num_ctx=entry["context_length"])) for name, entry in hot]
    return None


PRELOAD_SLOWEST = 4.0  # a new home for a queue is at most this many times slower than where the model is hot


def queue_backlog(waiters, new_homes, now_mono, now):
    """{model: seconds the oldest request asking for it (not for a fallback) has waited in herd's
    queue}, leaving out herd's own benchmark runs (bound to one node) and models given a new home
    for a queue in the last PRELOAD_WINDOW_S (`new_homes`: model -> monotonic time; one at a time,
    the queue may be gone once it is loaded). `now`: time.perf_counter(), as waiters are stamped."""
    backlog = {}
    for waiter in waiters:
        model = waiter.models[0]
        if (waiter.cancelled or waiter.call.only_node is not None
                or now_mono - new_homes.get(model, -1e9) < PRELOAD_WINDOW_S):
            continue
        backlog[model] = max(backlog.get(model, 0.0), now - waiter.enqueued)
    return backlog


def plan_preload(nodes, demand, now, now_mono, backlog=None):
    """(node, model, why, for a queue) to load ahead of demand, or None. A model asked for at least
    PRELOAD_MIN_REQUESTS times in the last PRELOAD_WINDOW_S is loaded onto a measured node that
    has memory free for it without evicting anything and is not loading something else, when:
    - the node is faster than every node where the model is hot; or
    - requests for the model have waited in herd's queue (`backlog`: {model: seconds the oldest
      has waited}) as long as a load on the node takes, or the node has never timed a load (then
      herd cannot tell whether sending one of them there cold would beat the wait: its prior is a
      guess), and the node is at most PRELOAD_SLOWEST times slower than where the model is hot; or
    - the model is hot on only one fast node, and the node keeps PRELOAD_SPARE of its memory free
      with it loaded: a second home (overflow and large contexts then find it hot).
    `demand` maps each model to the times (monotonic) of its recent requests."""
    backlog = backlog or {}
    for model, times in demand.items():
        if sum(1 for t in times if now_mono - t <= PRELOAD_WINDOW_S) < PRELOAD_MIN_REQUESTS:
            continue
        online = [n for n in nodes if n.status(now) == "online"]
        hot = [n for n in online if model in n.loaded]
        best_hot = max((n.decode_speed or 0 for n in hot), default=0)
        for node in sorted(online, key=lambda n: -(n.decode_speed or 0)):
            speed = node.decode_speed
            budget = node.budget_bytes()
            if (model in node.loaded or model not in node.models or node.preloading
                    or speed is None or not budget or pushed_out(node, model)
                    or node.loading_other(model, now_mono)):
                continue  # (a model split with system RAM, loading or loaded, pushes out the others)
            need = node.model_bytes(model) * (1 + PRELOAD_HEADROOM)
            free_after = budget - node.memory_in_use() - need
            if free_after < 0:
                continue
            if speed >= PRELOAD_FASTER_BY * best_hot:
                return node, model, "it is faster than where the model is hot", False
            waited = backlog.get(model)
            if waited is not None and speed * PRELOAD_SLOWEST >= best_hot:
                if node.load_cost is None:
                    return node, model, "requests for it wait in herd's queue, and the node has not timed a load yet", True
                fixed, per_gb = node.load_cost
                if waited >= fixed + node.weights_gb(model) * per_gb:
                    return (node, model, f"requests for it have waited {waited:.1f} s in herd's queue, as long as a "
                            "load there", True)
            rivals = sum(1 for n in hot if (n.decode_speed or 0) * PRELOAD_FASTER_BY >= speed)
            if rivals < 2 and free_after >= PRELOAD_SPARE * budget:
                return node, model, "it has room to spare and the model has no other fast home", False
    return None


# Restoring a node's default context. A model loaded for a request's large num_ctx keeps that
# context: native requests are sent with it (Context rules), but a /v1 request cannot set one, and
# each would make Ollama reload the model back. Each of them is routed elsewhere on its own merits,
# and may wait in herd's queue there, while one reload would have served them all. So herd keeps
# count, per node and model, of the seconds requests have waited in its queue that the node would
# serve sooner, were the model there at its default context (its estimate without the reload);
# when that reaches what the reload takes there, herd reloads it at the default itself (paying for
# it once the waiting has cost as much: at most twice what knowing the future would have paid).
# Only while the model is idle there and no queued request needs the context it runs with: no
# drain, no request sent at the old context after it, and the context is not taken from requests
# that still use it (each way back up is a later request's own reload, priced as any reload).

RENT_WAITERS = 32  # queued requests per model looked at each time: 32 x WARMER_EVERY_S is beyond any reload
RENT_GAP_S = 4 * WARMER_EVERY_S  # a longer gap between counts (a busy warmer) counts as this much


@dataclass(frozen=True, slots=True)
class WarmLoad:
    """A load the warmer sends: /api/generate with the model's name alone, which loads it (at the
    node's default context) and does nothing else."""

    node_id: str
    url: str
    model: str
    why: str
    restore: bool  # a reload at the node's default context (herd noted it as under way)


def restorable(node, model, call, policy):
    """Would `call` reload `model` on `node` as it runs there, where at the node's default it would not?"""
    if model not in node.loaded or model in node.switching:
        return False
    default = node.context_default(model)
    return (needs_reload(call, node.running_context(model), default, node.load_options.get(model, {}), policy)
            and not needs_reload(call, default, default, {}, policy))


def off_default(nodes, now):
    """{model: [online nodes that run it at a context or with options other than their default]}."""
    found = {}
    for node in nodes:
        if node.status(now) != "online":
            continue
        for model in node.loaded:
            options = node.load_options.get(model, {})
            if model not in node.switching and (
                    node.running_context(model) != node.context_default(model)
                    or any(options.get(k) is not None for k in RELOAD_OPTIONS)):
                found.setdefault(model, []).append(node)
    return found


def waiting_for_default(nodes, waiters, *, parallel, policy, usual_output, priors, now, now_mono):
    """({(node_id, model, context): requests in herd's queue that the node would serve sooner than
    any other, were the model at its default context there instead of `context`}, {the same keys
    for the nodes where a queued request needs `context` as it is})."""
    odd = off_default(nodes, now)
    counts, keep, ahead = collections.Counter(), set(), collections.Counter()
    if not odd:
        return counts, keep
    healthy = {}
    for waiter in waiters:
        model = waiter.models[0]
        if (waiter.cancelled or waiter.call.only_node is not None or model not in odd
                or ahead[model] >= RENT_WAITERS):
            continue
        call = waiter.call
        for node in odd[model]:
            ctx = node.running_context(model)
            default = node.context_default(model)
            if (needs_reload(call, default, default, {}, policy)
                    and not needs_reload(call, ctx, default, node.load_options.get(model, {}), policy)):
                keep.add((node.node_id, model, ctx))  # served as it runs, not at the default
        at_odds = [node for node in odd[model] if restorable(node, model, call, policy)]
        if at_odds:
            if model not in healthy:
                healthy[model] = [node for node in nodes if eligibility(node, model, now) == "ok"]
            estimates = estimate_all(healthy[model], model, call, parallel=parallel, policy=policy,
                                     usual_output=usual_output, ahead=ahead[model], priors=priors, admit=True,
                                     now=now_mono, follow_ups=None)
            elsewhere = min((e["eta"] for node, e in estimates if node not in at_odds), default=math.inf)
            for node, e in estimates:
                if node in at_odds and e["eta"] - e["reload"] < elsewhere:
                    counts[node.node_id, model, node.running_context(model)] += 1
        ahead[model] += 1
    return counts, keep


def plan_restore(nodes, rent, keep, priors, now, now_mono):
    """(node, model, reload seconds, why) to reload at the node's default context, or None: the
    first whose rent (`rent`: seconds waited, keyed as waiting_for_default's) has reached the
    reload's time there, while the model is idle there and not in `keep`."""
    by_id = {node.node_id: node for node in nodes}
    for (node_id, model, ctx), waited in rent.items():
        node = by_id.get(node_id)
        if (node is None or (node_id, model, ctx) in keep or node.status(now) != "online"
                or node.running_context(model) != ctx or model in node.switching or node.running_count(model)
                or node.preloading or node.loading_other(model, now_mono)):
            continue
        fixed, per_gb = node.load_cost or (priors.load_fixed_s, priors.load_s_per_gb)
        seconds = fixed + node.weights_gb(model) * per_gb
        if waited >= seconds:
            return node, model, seconds, (f"requests have waited {waited:.1f} s in herd's queue that it would serve "
                                          f"at its default context, as long as reloading it there takes")
    return None


class Warmer:
    """Background thread that carries out the warming plans (see the top of this section)."""

    def __init__(self, fleet, settings, capabilities):
        self.fleet = fleet
        self.settings = settings
        self.capabilities = capabilities
        self.session = control_session()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="herd-warmer", daemon=True)

    def run(self):
        while not self.stop.wait(WARMER_EVERY_S):
            try:
                plan = self.fleet.calibration_plan() if self.settings.get("calibrate") else None
                if plan is not None:
                    self.calibrate(*plan)
                if self.settings.get("preload"):
                    self.preload()
            except Exception:  # noqa: BLE001 - one bad plan must not stop warming for good
                log.exception("warmer failed; trying again")

    def calibrate(self, node_id, url, hot):
        """Time one short generation on the first chat model among `hot` ([(model, the options it
        runs with)]), sent with those options so that Ollama does not reload it."""
        for model, options in hot:
            caps = self.capabilities.get(model)
            if caps is not None and "completion" not in caps:
                continue  # an embedding model cannot generate
            body = {"model": model, "prompt": CALIBRATION_PROMPT, "stream": False,
                    "options": dict(options, num_predict=CALIBRATION_TOKENS)}
            try:
                resp = self.session.post(url + "/api/generate", json=body, timeout=(NODE_CALL_TIMEOUT, 120))
                timings = read_reply(resp.content[-TAIL_BYTES:]).timings if resp.status_code == 200 else None
            except requests.RequestException as exc:
                log.debug("calibration of %s failed: %s", node_id, exc)
                timings = None
            if timings:
                self.fleet.calibrated(node_id, model, timings)
            return

    def preload(self):
        load = self.fleet.restore_plan() or self.fleet.preload_plan()
        if load is None:
            return
        log.info("loading %s on %s: %s", load.model, load.node_id, load.why)
        started = time.monotonic()
        try:
            ok = self.session.post(load.url + "/api/generate", json={"model": load.model},
                                   timeout=(NODE_CALL_TIMEOUT, 600)).status_code == 200
        except requests.RequestException as exc:
            log.warning("loading %s on %s failed: %s", load.model, load.node_id, exc)
            ok = False
        self.fleet.preloaded(load, ok, time.monotonic() - started)


# =============================================================================================
# The fleet: one object, one lock. Every change of fleet state goes through its methods,
# the admission queue included (granting a slot is a change of fleet state).
# =============================================================================================

# A failing node rests 1 s, then 2, 4, ... up to a minute while it keeps failing; the first
# request after a rest probes it. A node herd could not reach rests until herd's own poll reaches
# it, or its agent reports its Ollama back after reporting it down (see Node.apply_report).
COOLDOWN_FIRST_S = 1.0
COOLDOWN_MAX_S = 60.0
PROBE_AFTER_S = 5.0  # requests waiting this long for a model whose every node rests get one probed early
CLIENT_CHECK_S = 0.25  # how often a queued request checks that its client is still there


def node_view(node, now, parallel):
    """One node as /fleet/status shows it."""
    speed = node.decode_speed
    return {
        "node_id": node.node_id, "status": node.status(now), "ollama_url": node.url,
        "source": node.source, "hostname": node.hostname, "memory": node.memory,
        "gpu": node.gpu, "cpu_percent": node.cpu_percent,
        "num_parallel": slots(node, parallel), "memory_budget_gb": node.memory_budget_gb,
        "default_context_length": node.context_default(None),
        "default_context": ("reported" if node.default_context_length else "seen" if node.default_ctx
                            else "guessed"),
        "ollama_version": node.ollama_version, "ollama_error": node.ollama_error,
        "models_available": sorted(node.models),
        "models_loaded": [{"name": name, "size_vram": entry.get("size_vram", entry.get("size")),
                           "size": entry.get("size"), "context_length": entry.get("context_length"),
                           "expires_at": entry.get("expires_at"), "requests_active": node.running_count(name),
                           "conversations": sum(1 for c in node.prompts[name].held if c.prefix.hashes)
                                            if name in node.prompts else 0}
                          for name, entry in node.loaded.items()],
        "requests_active": node.in_flight, "last_seen": node.last_seen,
        "decode_gbs": round(speed, 1) if speed else None,
        "failures": node.failures, "last_failure": node.last_failure,
        "cooling_down_s": round(max(0.0, node.cooldown_until - now), 1),
    }


def node_models_view(node, now):
    """One node's installed and loaded models with sizes (the dashboard's model management)."""
    return {"node_id": node.node_id, "status": node.status(now), "memory_budget_gb": node.memory_budget_gb,
            "models": [{"name": name, "size_gb": round((entry.get("size") or 0) / GB, 2),
                        "loaded": name in node.loaded,
                        "context_length": (node.loaded.get(name) or {}).get("context_length"),
                        "expires_at": (node.loaded.get(name) or {}).get("expires_at"),
                        "requests_active": node.running_count(name)}
                       for name, entry in sorted(node.models.items())]}


def node_health_view(node, now):
    """What the health findings read of one node."""
    return {"node_id": node.node_id, "status": node.status(now), "reachable": node.reachable,
            "ollama_error": node.ollama_error, "ollama_version": node.ollama_version, "last_seen": node.last_seen,
            "interval_s": node.interval_s, "memory": node.memory, "source": node.source, "ollama_url": node.url,
            "returns_last_hour": sum(1 for t in node.returns if now - t < 3600),
            # the agent reaches its Ollama, herd's own requests are refused: it listens on loopback
            "loopback_only": (node.source == "agent" and node.reachable and node.failure_kind == "unreachable"
                              and "refused" in (node.last_failure or "")
                              and not is_loopback(urlsplit(node.url).hostname))}


def pull_target(nodes, model, now):
    """Where a pull should go: the best online node that has the model, else the one with the
    most free memory; None when no node is online."""
    online = [n for n in nodes if n.status(now) == "online"]

    def free(node):
        budget = node.budget_bytes()
        return (budget - node.memory_in_use()) if budget else 0

    return max(online, key=lambda n: (model in n.models, free(n), -n.in_flight)).node_id if online else None


class Fleet:
    """The router's whole view of the fleet: nodes, the requests running on them, the queue."""

    def __init__(self, config):
        self.config = config
        self.lock = threading.Lock()
        self.nodes = {}
        self.waiters = []  # oldest first
        self.queued = collections.Counter()  # model -> waiters that could take it
        self.backlog_loads = {}  # model -> when (monotonic) it was last preloaded for a queue
        self.output_tokens = {}  # model -> recent completion token counts
        self.usual_output = {}  # model -> their median
        self.demand = {}  # model -> times of its recent requests
        self.context_policy = config.context_protection or RUNTIME_SETTINGS["context_protection"]
        self.priors = None  # for unmeasured nodes: from the slowest measured (None: work them out again)
        self.priors_at = 0.0  # time.monotonic() when they were worked out
        self.follow_ups = FollowUps()  # how often conversations come back to their prompt caches
        self.rent = {}  # (node_id, model, context) -> seconds queued for want of the default context there
        self.rent_at = time.monotonic()  # when the rent was last added to

    # -- reports from agents and polls ------------------------------------------------------

    def report(self, node_id, url, source, interval_s, data):
        """Apply a heartbeat or poll result. `data` holds the heartbeat fields that were present."""
        now = time.time()
        with self.lock:
            node = self.nodes.get(node_id)
            if node is None or node.url != url:
                previous = node
                node = Node(node_id=node_id, url=url, source=source, interval_s=interval_s)
                if previous is not None:  # same id from a new address: keep the live counts
                    node.in_flight, node.running = previous.in_flight, previous.running
                self.nodes[node_id] = node
                self.priors = None
                log.info("node %s registered at %s (%s)", node_id, url, source)
            was_offline = node.last_seen and node.status(now) == "offline"
            was_online = node.status(now) == "online"
            node.source, node.interval_s = source, interval_s
            node.apply_report(data)
            node.last_seen = now
            if not was_online and node.status(now) == "online":
                log.info("node %s online", node_id)
            if was_offline:
                keep_recent(node.returns, now)
            self._grant_waiters()

    def mark_unreachable(self, node_id, reason):
        """A poll could not reach the node's Ollama: keep the entry, stop routing to it."""
        with self.lock:
            node = self.nodes.get(node_id)
            if node is not None and node.reachable:
                node.reachable = False
                node.ollama_error = reason
                log.warning("node %s unreachable: %s", node_id, reason)

    def note_failure(self, lease, reason, unreachable):
        """A request failed on a node before its first byte: rest the node, longer each time."""
        with self.lock:
            node = self.nodes.get(lease.node_id)
            if node is None:
                return
            node.failures += 1
            node.failure_kind = "unreachable" if unreachable else "error"
            node.last_failure = reason
            rest = min(COOLDOWN_MAX_S, COOLDOWN_FIRST_S * 2 ** (node.failures - 1))
            node.cooldown_until = time.time() + rest
            log.warning("node %s cooling down for %g s after %d failure(s): %s", node.node_id, rest,
                        node.failures, reason)

    def tick(self):
        """Called a few times a second: hand slots to waiters when a node's rest has ended, and
        decide again for waiters that chose to wait (a deferral is bounded in time, and the
        requests it waits for may run much longer than herd expected)."""
        now = time.time()
        with self.lock:
            if not self.waiters:
                return
            rested = [n for n in self.nodes.values() if 0 < n.cooldown_until <= now]
            rested += self._probe_early(now, time.perf_counter())
            for node in rested:
                node.cooldown_until = 0.0
            if rested or any(waiter.deferred for waiter in self.waiters):
                self._grant_waiters()

    def _probe_early(self, now, clock):
        """Resting nodes to try again now: when requests have waited PROBE_AFTER_S for a model
        whose every node is resting, the one whose rest ends first (a rest that grew long on a node
        that failed many times must not keep a whole model away while others wait)."""
        early = []
        for waiter in self.waiters:
            if clock - waiter.enqueued < PROBE_AFTER_S:
                break  # oldest first: the rest waited less
            for model in waiter.models:
                nodes = [n for n in self.nodes.values() if eligibility(n, model, now)]
                if nodes and all(eligibility(n, model, now) == "failing" for n in nodes):
                    resting = [n for n in nodes if n.cooldown_until > now and n.reachable]
                    if resting:
                        early.append(min(resting, key=lambda n: n.cooldown_until))
        return early

    def reconcile(self, leases):
        """Rebuild the running counts from the leases actually held, when they disagree."""
        by_node = collections.defaultdict(list)
        for lease in leases:
            by_node[lease.node_id].append(lease)
        with self.lock:
            fixed = 0
            for node in self.nodes.values():
                held = [lease for lease in by_node.get(node.node_id, ()) if not lease.released]
                if collections.Counter(lease.model for lease in held) != collections.Counter(node.counts()):
                    fixed += 1
                    node.running, node.in_flight = {}, 0
                    for lease in held:
                        node.hold(lease)
            if fixed:
                log.warning("reaper corrected in-flight counts on %d node(s)", fixed)
                self._grant_waiters()

    def set_context_policy(self, policy):
        with self.lock:
            self.context_policy = policy

    # -- small reads --------------------------------------------------------------------------

    def has_node(self, node_id):
        with self.lock:
            return node_id in self.nodes

    def has_other_nodes(self, node_id):
        with self.lock:
            return any(other != node_id for other in self.nodes)

    def ollama_versions(self):
        with self.lock:
            return [n.ollama_version for n in self.nodes.values()]

    def loaded_models(self):
        """{model: size} of every model loaded on an online node."""
        now = time.time()
        with self.lock:
            return {name: n.model_bytes(name) for n in self.nodes.values() if n.status(now) == "online"
                    for name in n.loaded if name in n.models}

    def url_with(self, model):
        """The URL of some reachable node that has the model installed, or None."""
        now = time.time()
        with self.lock:
            for node in self.nodes.values():
                if model in node.models and node.reachable and node.status(now) != "offline":
                    return node.url
        return None

    def url_of(self, node_id):
        with self.lock:
            node = self.nodes.get(node_id)
            return node.url if node else None

    def in_flight_counts(self):
        """{(node_id, model): requests running} as the fleet counts them."""
        with self.lock:
            return {(n.node_id, model): count for n in self.nodes.values() for model, count in n.counts().items()}

    def served_count(self, node_id):
        with self.lock:
            node = self.nodes.get(node_id)
            return node.served if node else 0

    def spelling(self, name):
        """`name` as the fleet's nodes spell it (see model_spelling)."""
        with self.lock:
            return model_spelling(self.nodes.values(), name, time.time())

    def pull_target(self, model):
        with self.lock:
            return pull_target(list(self.nodes.values()), model, time.time())

    def pin(self, node_id, model):
        """A slot-free lease on a node the client named (model management)."""
        now = time.time()
        with self.lock:
            node = self.nodes.get(node_id)
            if node is None:
                raise RoutingError(404, f"no node named {node_id}; known nodes: "
                                   f"{', '.join(sorted(self.nodes)) or 'none'}", "unknown_node")
            if node.status(now) == "offline" or not node.reachable:
                raise RoutingError(503, f"node {node_id} is {node.status(now)}", "node_offline",
                                   retry_after=5)
            return Lease(node_id=node_id, url=node.url, model=model, score=0.0, breakdown={}, held=False)

    # -- warming ------------------------------------------------------------------------------

    def calibration_plan(self):
        """(node_id, url, [(model, options)]) of the next node to time (see Warming), or None."""
        with self.lock:
            plan = plan_calibration(self.nodes.values(), time.time(), time.monotonic())
            if plan is None:
                return None
            node, hot = plan
            node.calibrated_at = time.monotonic()
            return node.node_id, node.url, hot

    def calibrated(self, node_id, model, timings):
        """Fold a calibration's timings into the node's speeds (a clean sample when it ran alone)."""
        with self.lock:
            node = self.nodes.get(node_id)
            if node is None:
                return
            speed = record_speeds(node, model, node.weights_gb(model), timings, shared=1.0, alone=not node.in_flight)
            self.priors = None
        if speed is not None:
            log.info("calibrated %s with %s: %.0f GB/s of weights per token", node_id, model, speed)

    def preload_plan(self):
        """The WarmLoad of a model to load ahead of demand (see Warming), or None."""
        with self.lock:
            now_mono = time.monotonic()
            backlog = queue_backlog(self.waiters, self.backlog_loads, now_mono, time.perf_counter())
            plan = plan_preload(list(self.nodes.values()), self.demand, time.time(), now_mono, backlog)
            if plan is None:
                return None
            node, model, why, for_queue = plan
            node.preloading = model
            if for_queue:
                self.backlog_loads[model] = now_mono
            return WarmLoad(node.node_id, node.url, model, f"it is in demand, and {why}", restore=False)

    def restore_plan(self):
        """The WarmLoad that reloads a model at a node's default context (see Warming: restoring),
        or None. Adds the seconds requests waited since the last call to the rent first."""
        with self.lock:
            now, now_mono = time.time(), time.monotonic()
            elapsed, self.rent_at = min(now_mono - self.rent_at, RENT_GAP_S), now_mono
            nodes = list(self.nodes.values())
            priors = self.priors or unmeasured_priors(nodes)
            counts, keep = waiting_for_default(nodes, self.waiters, parallel=self.config.parallel,
                                               policy=self.context_policy, usual_output=self.usual_output,
                                               priors=priors, now=now, now_mono=now_mono)
            for key, count in counts.items():
                self.rent[key] = self.rent.get(key, 0.0) + count * elapsed
            self.rent = {(node_id, model, ctx): waited for (node_id, model, ctx), waited in self.rent.items()
                         if node_id in self.nodes and self.nodes[node_id].running_context(model) == ctx}
            plan = plan_restore(nodes, self.rent, keep, priors, now, now_mono)
            if plan is None:
                return None
            node, model, seconds, why = plan
            del self.rent[node.node_id, model, node.running_context(model)]
            node.preloading = model
            node.note_switch(model, node.context_default(model), {"num_ctx": None}, seconds, at_default=True)
            self._grant_waiters()  # the requests that waited for it may go there now
            return WarmLoad(node.node_id, node.url, model, why, restore=True)

    def preloaded(self, load, ok, seconds):
        """A WarmLoad has ended: learn its time; a restore that failed leaves the next report to say
        what runs there."""
        with self.lock:
            node = self.nodes.get(load.node_id)
            if node is None:
                return
            node.preloading = None
            if not ok:
                if load.restore:
                    node.switching.pop(load.model, None)
                return
            if seconds > HOT_LOAD_S:
                record_load(node, node.weights_gb(load.model), seconds)  # a load timed by herd itself
                self.priors = None
            switch = node.switching.get(load.model)
            if load.restore and switch is not None:  # done: nothing to wait for (a report soon says so too)
                node.switching[load.model] = (switch[0], time.monotonic(), switch[2])
                self._grant_waiters()
            if load.model not in node.loaded:
                node.note_loaded(load.model, node.context_default(load.model), {"num_ctx": None}, at_default=True)
                self._grant_waiters()

    # -- admission: choosing and holding slots -------------------------------------------------

    def acquire(self, call, admit=True, deadline=None):
        """Grant the best free slot for `call`, waiting in the admission queue when every node
        that could serve it is busy or failing. Tries `call.model`, then its fallbacks.

        With admit=False (reads such as /api/show) no slot is held. Raises RoutingError with the
        status and message the client should see.
        """
        deadline = deadline or (time.monotonic() + self.config.queue_timeout)
        with self.lock:
            lease, wait = self._choose(call, call.candidate_models(), self.queued, admit)
            if lease is not None:
                if admit:
                    keep_recent(self.demand.setdefault(lease.model, []), time.monotonic())
                    self._hold(lease)
                return lease
            models = servable_models(self._candidates(call), call, time.time())  # raises if none can
            if admit:
                keep_recent(self.demand.setdefault(models[0], []), time.monotonic())
            if len(self.waiters) >= self.config.max_queue:
                queue = (f"herd's queue is full ({self.config.max_queue} requests waiting)" if self.config.max_queue
                         else "herd queues no requests (--max-queue 0)")
                if wait == "failing":
                    raise RoutingError(503, f"every node that could serve {call.model} is resting after "
                                       f"failing, and {queue}; retry in a few seconds", "nodes_failing",
                                       retry_after=5)
                raise RoutingError(503, f"every node that could serve {call.model} is busy, and {queue}; "
                                   "retry shortly or add nodes", "queue_full", retry_after=5)
            waiter = Waiter(call=call, models=models, enqueued=time.perf_counter(), deferred=wait == "defer")
            self.waiters.append(waiter)
            self.queued.update(set(models))
        while not waiter.event.wait(min(CLIENT_CHECK_S, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or call.client_gone():
                break
        with self.lock:
            if waiter.lease is None:
                self._dequeue(waiter)
                if call.client_gone():
                    raise RoutingError(499, "the client disconnected while waiting", "cancelled")
                if waiter.cancelled:
                    raise RoutingError(503, "herd is shutting down; retry in a few seconds", "shutting_down",
                                       retry_after=5)
                waited = time.perf_counter() - waiter.enqueued
                reason = ("no node that could serve it recovered" if wait == "failing"
                          else "no slot became free")
                raise RoutingError(503, f"{reason} for {call.model} within {waited:.0f} s; "
                                   "retry later", "queue_timeout", retry_after=max(1, int(waited / 10)))
        waiter.lease.queued_ms = (time.perf_counter() - waiter.enqueued) * 1000
        return waiter.lease

    def release(self, lease, served, sent_ctx=None, timings=None):
        """Give a slot back. A model just served is loaded on that node: note how it runs, and
        learn the node's speed from the reply's timings."""
        with self.lock:
            if lease.released or not lease.held:
                return
            lease.released, lease.ended = True, time.monotonic()
            node = self.nodes.get(lease.node_id)
            slot = lease.prompt_slot
            if slot is not None:
                before = None
                if served:  # the reply ended: the slot holds prompt and reply
                    slot.used = time.monotonic()
                    self.follow_ups.finished(slot.prefix, slot.used)
                else:  # as far as herd knows, the attempt left the slot as it was
                    before, slot.used = lease.slot_before
                caches = node.prompts.get(lease.model) if node is not None else None
                if caches is not None:
                    caches.give_back(slot, before)
                else:
                    slot.busy = False
            if node is not None:
                if served and timings:
                    speed_before, load_before = node.decode_speed, node.load_cost
                    learn_from_reply(node, lease, timings)
                    # a node's first speed or load time changes the priors at once; later ones
                    # move them a little, so every PRIORS_EVERY_S is often enough
                    if (speed_before is None and node.decode_speed) or (load_before is None and node.load_cost):
                        self.priors = None
                node.drop(lease)
                if served:
                    node.served += 1
                    node.failures, node.failure_kind = 0, None
                    if sent_ctx is None:  # it ran with the default: the next report shows it
                        node.context_probe.add(lease.model)
                    else:
                        node.context_probe.discard(lease.model)
                    if lease.loaded_ctx is None and lease.model not in node.loaded:
                        node.note_loaded(lease.model, sent_ctx or node.context_default(lease.model),
                                         at_default=sent_ctx is None)
                if (not node.running_count(lease.model) and lease.model in node.loaded
                        and node.loading_split() - {lease.model}):
                    del node.loaded[lease.model]  # a split model loading there pushes it out once idle
                    node.unloaded_at[lease.model] = time.monotonic()
            if served and timings and timings.get("eval_count"):
                samples = self.output_tokens.setdefault(lease.model, Recent())
                samples.add(timings["eval_count"])
                self.usual_output[lease.model] = samples.quantile(0.5)
            self._grant_waiters()

    def note_sent(self, lease, runs_ctx, options, prefix):
        """herd is about to send a request that runs `lease.model` with context `runs_ctx` (None: the
        node's default) and these options. When that loads or reloads the model, the node runs it
        so from now on: later requests are routed and sent for that context (none is sent with the
        old one in between, which would reload it back), and wait for the load to finish. Its
        prompt goes into a slot's cache there (`prefix`)."""
        with self.lock:
            node = self.nodes.get(lease.node_id)
            if node is None:
                return
            options = dict({k: options[k] for k in RELOAD_OPTIONS if k in options}, num_ctx=runs_ctx)
            ctx = context_number(runs_ctx) or node.context_default(lease.model)
            entry = node.loaded.get(lease.model)
            held = node.load_options.get(lease.model, {})
            if (entry is None or node.running_context(lease.model) != ctx
                    or any(held.get(k) != options.get(k) for k in RELOAD_OPTIONS)):
                node.note_switch(lease.model, ctx, options, lease.load_s,
                                 at_default=context_number(runs_ctx) is None)
            lease.prompt_slot, lease.slot_before = node.take_slot(lease.model, prefix,
                                                                  slots(node, self.config.parallel))
            if lease.prompt_slot is not None:
                self.follow_ups.started(prefix, time.monotonic())

    def _candidates(self, call):
        if call.only_node is None:
            return list(self.nodes.values())
        return [node for node in self.nodes.values() if node.node_id == call.only_node]

    def _choose(self, call, models, queued, admit=True):
        now = time.monotonic()
        if self.priors is None or now - self.priors_at > PRIORS_EVERY_S:
            self.priors, self.priors_at = unmeasured_priors(self.nodes.values()), now
        return choose(self._candidates(call), call, models, parallel=self.config.parallel, priors=self.priors,
                      policy=self.context_policy, usual_output=self.usual_output, queued=queued, admit=admit,
                      follow_ups=self.follow_ups)

    def _hold(self, lease):
        node = self.nodes[lease.node_id]
        if lease.reload and node.running_count(lease.model):  # Ollama reloads once they are done
            lease.drain = tuple(node.running[lease.model].leases)
        lease.started = time.monotonic()
        lease.company_at_start = company(node.counts(), lease.model, extra=1)
        node.hold(lease)

    def cancel_waiters(self):
        """Shutdown: every queued request stops waiting (and is answered 503)."""
        with self.lock:
            for waiter in self.waiters:
                waiter.cancelled = True
                waiter.event.set()

    def _dequeue(self, waiter):
        self.waiters.remove(waiter)
        self.queued.subtract(set(waiter.models))

    def _grant_waiters(self):
        """Late binding: hand every free slot to the oldest waiter that wants it. Waiters for a
        model with no free slot anywhere are passed over without scoring (a long queue stays cheap)."""
        if not self.waiters:
            return
        ahead = collections.Counter()  # model -> waiters still queued before the one being looked at
        full = set()  # models with no free slot on any node (granting slots only adds to it)
        seen_free = set()  # models found with a free slot since the last grant
        for waiter in list(self.waiters):
            if waiter.cancelled:
                continue
            for model in waiter.models:  # each model's nodes looked at once, not once per waiter
                if model in full or model in seen_free:
                    continue
                if self._free_slot(model):
                    seen_free.add(model)
                else:
                    full.add(model)
            if all(model in full for model in waiter.models):
                waiter.deferred = False
                continue  # none of its models has a free slot: it keeps its place, unscored
            lease, wait = self._choose(waiter.call, waiter.models, ahead)
            waiter.deferred = wait == "defer"
            if lease is None:
                ahead.update(waiter.models)
                continue
            self._hold(lease)
            waiter.lease = lease
            self._dequeue(waiter)
            waiter.event.set()
            seen_free.clear()  # it may have taken some model's last free slot

    def _free_slot(self, model):
        now = time.time()
        return any(eligibility(n, model, now) == "ok" and n.running_count(model) < slots(n, self.config.parallel)
                   for n in self.nodes.values())

    # -- views -------------------------------------------------------------------------------

    def online_nodes(self):
        now = time.time()
        with self.lock:
            return [(n.node_id, n.url, dict(n.models), dict(n.loaded)) for n in self.nodes.values()
                    if n.status(now) == "online"]

    def status(self):
        """The /fleet/status document."""
        now = time.time()
        with self.lock:
            nodes = [node_view(node, now, self.config.parallel) for node in self.nodes.values()]
            queued = len(self.waiters)
            queued_by_model = {model: count for model, count in self.queued.items() if count > 0}
        online = [n for n in nodes if n["status"] == "online"]
        return {"fleet": {"nodes_total": len(nodes), "nodes_online": len(online),
                          "models_loaded": sum(len(n["models_loaded"]) for n in online),
                          "requests_active": sum(n["requests_active"] for n in nodes),
                          "requests_queued": queued, "queued_by_model": queued_by_model},
                "nodes": nodes}

    def management(self):
        """Per node: installed and loaded models with sizes (dashboard model management)."""
        now = time.time()
        with self.lock:
            return [node_models_view(node, now) for node in self.nodes.values()]

    def health_view(self):
        """What health findings read of each node."""
        now = time.time()
        with self.lock:
            return [node_health_view(node, now) for node in self.nodes.values()]

    def inventory(self):
        """{node_id: {model: GB on disk}} of the nodes that are not offline."""
        now = time.time()
        with self.lock:
            return {n.node_id: {name: round((entry.get("size") or 0) / GB, 2) for name, entry in n.models.items()}
                    for n in self.nodes.values() if n.status(now) != "offline"}

    def room_for(self):
        """{(node_id, model): True} where the model is loaded or fits in the node's free memory."""
        with self.lock:
            return {(n.node_id, name): name in n.loaded or (n.budget_bytes() or 0) - n.memory_in_use() >= n.model_bytes(name)
                    for n in self.nodes.values() for name in n.models}

    def model_state(self, node_id, model):
        """'loaded', 'not loaded', 'not installed' or 'unknown node'."""
        with self.lock:
            node = self.nodes.get(node_id)
            if node is None:
                return "unknown node"
            if model not in node.models:
                return "not installed"
            return "loaded" if model in node.loaded else "not loaded"

    def slots_of(self, node_id):
        with self.lock:
            node = self.nodes.get(node_id)
            return slots(node, self.config.parallel) if node else 1

    def forget_model(self, node_id, model):
        """A model was deleted from a node: it is gone until a report says otherwise."""
        with self.lock:
            node = self.nodes.get(node_id)
            if node is not None:
                node.models.pop(model, None)
                if not node.running_count(model):
                    node.loaded.pop(model, None)

    def gauges(self):
        """/metrics gauges: requests in flight per node and model, queued per model, node up."""
        now = time.time()
        with self.lock:
            in_flight = {(("node", n.node_id), ("model", model)): count for n in self.nodes.values()
                         for model, count in n.counts().items()}
            queued = {(("model", model),): count for model, count in self.queued.items() if count > 0}
            up = {(("node", n.node_id),): int(n.status(now) != "offline" and n.reachable) for n in self.nodes.values()}
        return {("herd_requests_in_flight", "Requests running on a node, per model."): in_flight,
                ("herd_requests_queued", "Requests waiting in herd's queue, per model."): queued,
                ("herd_node_up", "1 when the node reports and its Ollama answers (resting or not)."): up}


# =============================================================================================
# Node polling and discovery: agentless `--node URL` nodes, the `local` Ollama, mDNS
# =============================================================================================

MDNS_SERVICE = "_herd._tcp.local."


def poll_ollama(session, url):
    """Ask an Ollama for version, tags and ps; returns the heartbeat's `ollama` block, checked as a
    heartbeat's is (an Ollama that answers something herd cannot read counts as unreachable)."""
    try:
        version = session.get(url + "/api/version", timeout=NODE_CALL_TIMEOUT).json().get("version")
        models = session.get(url + "/api/tags", timeout=NODE_CALL_TIMEOUT).json().get("models") or []
        loaded = session.get(url + "/api/ps", timeout=NODE_CALL_TIMEOUT).json().get("models") or []
        return read_ollama_block({"reachable": True, "version": version, "models": models, "loaded": loaded})
    except requests.ConnectionError as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else "cannot connect"
        return {"reachable": False, "error": f"Ollama at {url}: {reason}; is `ollama serve` running there?"}
    except requests.Timeout:
        return {"reachable": False, "error": f"Ollama at {url} did not answer within {NODE_CALL_TIMEOUT:g} s"}
    except (requests.RequestException, ValueError, AttributeError) as exc:
        return {"reachable": False, "error": f"Ollama at {url} answered oddly: {str(exc)[:200]}"}
    except HerdError as exc:
        return {"reachable": False, "error": f"Ollama answered something herd cannot read: {exc.message}"}


class NodePoller:
    """Polls agentless nodes (and the `local` Ollama) in background threads, one per node."""

    def __init__(self, fleet, config):
        self.fleet = fleet
        self.config = config
        self.session = control_session()
        self.stop = threading.Event()
        targets = list(config.nodes)
        if not targets and config.local:
            targets = [("local", LOCAL_OLLAMA)]
        self.threads = [threading.Thread(target=self.run, args=target, name=f"herd-poll-{target[0]}",
                                         daemon=True) for target in targets]

    def start(self):
        for thread in self.threads:
            thread.start()

    def run(self, name, url):
        source = "poll" if self.config.nodes else "local"
        while not self.stop.is_set():
            if source == "local" and self.fleet.has_other_nodes("local"):
                self.stop.wait(self.config.poll_interval)  # agents came: the local fallback rests
                continue
            try:
                result = poll_ollama(self.session, url)
                if result["reachable"]:
                    self.fleet.report(name, url, source, self.config.poll_interval, {"ollama": result})
                elif self.fleet.has_node(name):
                    self.fleet.mark_unreachable(name, result["error"])
            except Exception:  # noqa: BLE001 - one bad poll must not stop polling the node for good
                log.exception("polling %s failed", name)
            self.stop.wait(self.config.poll_interval)


class Advertiser:
    """Announces the router as `_herd._tcp.local.` so agents find it. Registering blocks for
    about two seconds, so it happens in a thread, off the start-up path. Liveness
    never comes from mDNS: heartbeats decide."""

    def __init__(self, host, port):
        self.host, self.port = host, int(port)  # Waitress reports its port as a string
        self.zeroconf = None
        self.info = None
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._register, name="herd-mdns", daemon=True).start()

    def _register(self):
        try:
            from zeroconf import InterfaceChoice, ServiceInfo, Zeroconf, get_all_addresses

            if is_loopback(self.host):
                interfaces, addresses = [self.host], [self.host]
            elif self.host in ("0.0.0.0", "", "::"):
                interfaces = InterfaceChoice.All
                addresses = [a for a in get_all_addresses() if not a.startswith("127.")] or ["127.0.0.1"]
            else:
                interfaces, addresses = [self.host], [self.host]
            name = f"herd on {socket.gethostname()} port {self.port}".replace(".", "-")
            self.info = ServiceInfo(MDNS_SERVICE, f"{name}.{MDNS_SERVICE}", port=self.port,
                                    parsed_addresses=addresses, properties={"version": __version__})
            zeroconf = Zeroconf(interfaces=interfaces)
            zeroconf.register_service(self.info)
            with self.lock:
                self.zeroconf = zeroconf
                closed = self.closed
            if closed:  # the router stopped while registering
                self.close()
                return
            log.info("advertising %s on mDNS at %s", MDNS_SERVICE, ", ".join(addresses))
        except Exception as exc:  # noqa: BLE001 - mDNS is a convenience; the router runs without it
            log.warning("mDNS advertising failed (%s); agents need --router-url", exc)

    def close(self):
        with self.lock:
            self.closed = True
            zeroconf, self.zeroconf = self.zeroconf, None
        if zeroconf is not None:
            try:
                zeroconf.unregister_service(self.info)
            finally:
                zeroconf.close()


# =============================================================================================
# VRAM fallback: when no node can load the model, a loaded model of the same kind serves it
# =============================================================================================

def has_images(body):
    if body.get("images"):
        return True
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        if message.get("images"):
            return True
        content = message.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image_url", "image")
                                             for p in content):
            return True
    return False


def required_capabilities(call):
    """What a stand-in model must be able to do for this request (Ollama's capability names)."""
    if "embed" in call.endpoint:
        return {"embedding"}
    needs = {"completion"}
    if call.body.get("tools"):
        needs.add("tools")
    if has_images(call.body):
        needs.add("vision")
    return needs


def vram_substitute(call, loaded, capabilities):
    """The largest loaded model that can do everything the request needs, or None."""
    needs = required_capabilities(call)
    able = [(size, name) for name, size in loaded.items()
            if name != call.model and needs <= set(capabilities.get(name) or ())]
    return max(able)[1] if able else None


class Capabilities:
    """What each model can do, read once per model from a node's /api/show and cached."""

    RETRY_AFTER_S = 30.0  # a failed look-up is tried again after this

    def __init__(self, fleet):
        self.fleet = fleet
        self.session = control_session()
        self.known = {}
        self.failed = {}
        self.lock = threading.Lock()

    def get(self, model):
        with self.lock:
            if model in self.known:
                return self.known[model]
            if time.monotonic() - self.failed.get(model, -1e9) < self.RETRY_AFTER_S:
                return None
        url = self.fleet.url_with(model)
        caps = None
        if url:
            try:
                caps = self.session.post(url + "/api/show", json={"model": model},
                                         timeout=NODE_CALL_TIMEOUT).json().get("capabilities")
            except (requests.RequestException, ValueError, AttributeError):
                caps = None
        with self.lock:
            if isinstance(caps, list):
                self.known[model] = caps
            else:
                self.failed[model] = time.monotonic()
        return caps if isinstance(caps, list) else None


# =============================================================================================
# Auto-pull: a model no node has is pulled onto the roomiest node
# =============================================================================================

PULLS_AT_ONCE = 4  # pulls herd runs at a time (each streams gigabytes onto a node)
PULLS_KEPT = 100  # finished pulls the dashboard lists, the newest
PULL_AGAIN_AFTER_S = 600.0  # a model whose pull failed (a typo, most often) is not auto-pulled again sooner


class Pulls:
    """Model pulls started by herd (auto-pull, dashboard): at most one per model and
    PULLS_AT_ONCE in all at a time; the newest PULLS_KEPT that ended are still listed."""

    def __init__(self):
        self.session = control_session()
        self.lock = threading.Lock()
        self.pulls = {}  # model -> progress dict

    @staticmethod
    def ended(progress):
        return progress["status"] in ("success", "failed")

    def _running(self):
        return [p for p in self.pulls.values() if not self.ended(p)]

    def ensure(self, model, fleet):
        """Start pulling `model` onto the node with the most free memory; returns what to tell
        the client, or None when no node is there to pull onto."""
        watch = "watch GET /dashboard/api/model-management and retry when it is done"
        with self.lock:
            known = self.pulls.get(model)
            if known and not self.ended(known):
                return f"herd is pulling it onto {known['node_id']} ({known['percent']}%); {watch}"
            if known and known["status"] == "failed" and time.time() - known["ended"] < PULL_AGAIN_AFTER_S:
                return (f"herd's pull of it onto {known['node_id']} failed ({known['error']}); check the "
                        f"name, or pull it from the dashboard")
        node_id = fleet.pull_target(model)
        if node_id is None:
            return None
        refused = self.start(model, node_id, fleet.url_of(node_id))
        return f"{refused}; retry later" if refused else f"herd started pulling it onto {node_id} (auto_pull); {watch}"

    def start(self, model, node_id, url):
        """Start a pull; None when it started, else why not (the model is being pulled, or
        PULLS_AT_ONCE pulls run already)."""
        with self.lock:
            running = self.pulls.get(model)
            if running and not self.ended(running):
                return f"herd is pulling {model} onto {running['node_id']} already"
            if len(self._running()) >= PULLS_AT_ONCE:
                return f"herd is pulling {PULLS_AT_ONCE} models already (at most {PULLS_AT_ONCE} at once)"
            self.pulls.pop(model, None)  # (re-added last: the newest)
            self.pulls[model] = {"model": model, "node_id": node_id, "status": "starting", "percent": 0,
                                 "started": time.time(), "ended": None, "error": None}
            ended = [name for name, p in self.pulls.items() if self.ended(p)]
            for name in ended[:max(0, len(ended) - PULLS_KEPT)]:  # oldest first
                del self.pulls[name]
        log.info("pulling %s onto %s", model, node_id)
        threading.Thread(target=self._run, args=(model, url), name=f"herd-pull-{model}", daemon=True).start()
        return None

    def _run(self, model, url):
        progress = self.pulls[model]
        try:
            with self.session.post(url + "/api/pull", json={"model": model, "stream": True},
                                   stream=True, timeout=(NODE_CALL_TIMEOUT, 600)) as response:
                if response.status_code != 200:
                    raise ValueError(upstream_message(response.content))
                for line in response.iter_lines():
                    event = json.loads(line) if line else {}
                    if not isinstance(event, dict):
                        continue
                    if event.get("error"):
                        raise ValueError(str(event["error"])[:300])
                    with self.lock:
                        progress["status"] = str(event.get("status", progress["status"]))[:100]
                        total, completed = event.get("total"), event.get("completed") or 0
                        if isinstance(total, (int, float)) and total > 0 and isinstance(completed, (int, float)):
                            progress["percent"] = max(0, min(100, int(100 * completed / total)))
            with self.lock:
                if progress["status"] != "success":
                    raise ValueError("the node ended the pull without success")
                progress["percent"], progress["ended"] = 100, time.time()
            log.info("pulled %s onto %s", model, progress["node_id"])
        except Exception as exc:  # noqa: BLE001 - whatever the node sent, the pull ends as failed, not stuck
            with self.lock:
                progress["status"], progress["error"], progress["ended"] = "failed", str(exc)[:300], time.time()
            log.warning("pull of %s onto %s failed: %s", model, progress["node_id"], exc)

    def snapshot(self):
        with self.lock:
            return [dict(p) for p in self.pulls.values()]


# =============================================================================================
# Watchdog: each phase of a running request has its limit, and the in-flight counts stay true
# =============================================================================================
#
# A client that leaves is noticed by Waitress only on the next write, and a node that goes silent
# (a model load, a hang) holds its stream open for ever: the watchdog looks at every running
# request a few times a second and cuts its upstream connection when its client left or its node
# broke a limit. It also ends the rest of resting nodes that waiters need, and corrects in-flight
# counts that disagree with the requests actually running.

WATCHDOG_PERIOD_S = 0.2  # how often running requests are checked: a client that left is cut within it
RECONCILE_EVERY_S = 10.0
_watched = threading.local()  # the Exchange whose upstream connection the current thread opens


class UpstreamFailure(Exception):
    """A node failed before its first byte reached the client: the request may be retried."""

    def __init__(self, message, status=502, unreachable=False, timed_out=False):
        super().__init__(message)
        self.status = status
        self.unreachable = unreachable
        self.timed_out = timed_out


class WatchedHTTPConnection(urllib3.connection.HTTPConnection):
    """Hands itself to the request's Exchange, so the watchdog can cut a silent upstream."""

    def request(self, *args, **kwargs):
        exchange = getattr(_watched, "exchange", None)
        if exchange is not None:
            exchange.attach(self)
        return super().request(*args, **kwargs)


class WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
    request = WatchedHTTPConnection.request


class WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


class Watchdog:
    """Background thread: checks every running exchange, wakes queued requests when a node's
    rest ends, and reconciles in-flight counts."""

    def __init__(self, proxy, fleet):
        self.proxy, self.fleet = proxy, fleet
        self.stop = threading.Event()
        self.suspect = None
        self.thread = threading.Thread(target=self.run, name="herd-watchdog", daemon=True)

    def run(self):
        next_reconcile = time.monotonic() + RECONCILE_EVERY_S
        while not self.stop.wait(WATCHDOG_PERIOD_S):
            now = time.monotonic()
            for exchange in self.proxy.running():
                try:
                    exchange.check(now)
                except Exception:  # noqa: BLE001 - one odd request must not stop the watchdog
                    log.exception("watchdog check failed")
            try:
                self.fleet.tick()
                if now >= next_reconcile:
                    self.reconcile()
                    next_reconcile = now + RECONCILE_EVERY_S
            except Exception:  # noqa: BLE001
                log.exception("watchdog tick failed")

    def reconcile(self):
        """Counts that disagree with the running requests twice in a row are corrected."""
        leases = [exchange.lease for exchange in self.proxy.running()
                  if exchange.lease is not None and exchange.lease.held and not exchange.lease.released]
        counts = collections.Counter((lease.node_id, lease.model) for lease in leases)
        if counts == self.suspect:
            self.fleet.reconcile(leases)
            self.suspect = None
        else:
            self.suspect = counts if counts != collections.Counter(self.fleet.in_flight_counts()) else None


# =============================================================================================
# Proxying and streaming: one Exchange per client request, one core for both APIs
# =============================================================================================
#
# A request's path: the route parses it into a Call (the door) and hands it to Proxy.serve,
# which makes its Exchange. Then, attempt by attempt: the Fleet grants a slot on the best node
# (waiting in the admission queue if it must), the body is adjusted for that node (fallback
# model, context protection), the upstream request is opened and its status and first byte read,
# and only then the client is answered, so a node that fails before its first byte is retried
# on the next-best node without the client noticing. A buffered reply ends the exchange once the
# server has written it and closes it; a stream ends it when the Relay ends, however it ends.

# Never copied from the node's response: Waitress frames the body itself, and fails a response
# that carries a header of its hop-by-hop list; herd also leaves out the length, the trailer list
# and the node's date and server (Waitress writes its own).
HOP_BY_HOP = waitress.task.hop_by_hop | {"content-length", "trailer", "date", "server"}
DECODED = frozenset(urllib3.response.HTTPResponse.CONTENT_DECODERS)  # Content-Encodings urllib3 undoes
UPSTREAM_ERRORS = (urllib3.exceptions.HTTPError, OSError)
# The requests that run a model on the node (both APIs): herd notes the load and the prompt slot
# each one makes there, and protects the context of the native ones.
INFERENCE_ENDPOINTS = frozenset({"/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
                                 "/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
# Waitress threads kept free of proxied requests, for health checks, heartbeats and the fleet API:
# a sixteenth of them, at least four.
THREAD_RESERVE_SHARE, THREAD_RESERVE_MIN = 16, 4


def describe(exc):
    """A short, human sentence for a network error (urllib3's reprs are long)."""
    reason = getattr(exc, "reason", None) or exc
    text = str(reason)
    if "Connection refused" in text:
        return "connection refused"
    if isinstance(exc, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return "timed out waiting for the node"
    return text.split(": ", 1)[-1][:200]


def reply_finished(call, tail):
    """Did the node say the reply is complete (Ollama `"done":true`, OpenAI `[DONE]`, pull success)?"""
    if call.api == "openai":
        return b"[DONE]" in tail
    tail = tail.replace(b" ", b"")
    return b'"status":"success"' in tail if call.endpoint == "/api/pull" else b'"done":true' in tail


def in_api_shape(data, api):
    """Is `data` an error body in the API's own shape (Ollama {"error": "..."}; OpenAI
    {"error": {"message": "...", ...}})?"""
    try:
        error = json.loads(data).get("error")
    except (ValueError, AttributeError, RecursionError):
        return False
    if api == "openai":
        return isinstance(error, dict) and isinstance(error.get("message"), str)
    return isinstance(error, str)


def upstream_chunks(resp):
    """Yield the node's bytes as they arrive: chunk by chunk when chunked, else what read1 has
    (iter_content would buffer a body that ends at connection close)."""
    if resp.chunked and resp.supports_chunked_reads():
        for chunk in resp.read_chunked():
            if chunk:
                yield chunk
        return
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            return
        yield chunk


def header_safe(text):
    """A response header value: printable ASCII as it is, anything else percent-encoded."""
    if text.isascii() and text.isprintable():
        return text
    return quote(text.encode("utf-8", "backslashreplace"), safe="/:@+")


def body_for(call, lease, policy):
    """The bytes to send the leased node: the client's own unless the model or its options had
    to change (a fallback model serves it; context protection). Each attempt starts from the
    client's options, not from what an earlier attempt made of them for another node."""
    if call.client_options is None:
        call.body.pop("options", None)
    else:
        call.body["options"] = dict(call.client_options)
    call.options_edited = call.added_options = False
    if lease.model != call.model:  # a fallback model serves it
        if call.body.get("model") != lease.model:
            log.info("request %s: %s served by fallback model %s on %s", call.request_id, call.model,
                     lease.model, lease.node_id)
            call.note({"fallback_model": lease.model})
            call.body["model"] = lease.model
            call.edited = True
    elif call.asked_name is not None and call.body.get("model") != call.asked_name:  # back to the primary
        call.body["model"] = call.asked_name
    if call.endpoint in INFERENCE_ENDPOINTS:
        protect_context(call, lease, policy)
    if call.edited or call.options_edited:
        return json.dumps(call.body).encode()
    if call.added_options:  # the client's bytes, with `options` added before the closing brace
        head = call.raw.rstrip()[:-1].rstrip()
        if head.endswith(b"{"):
            return json.dumps(call.body).encode()
        return head + b', "options": ' + json.dumps(call.body["options"]).encode() + b"}"
    return call.raw


BENCHMARK_TAG = "herd:benchmark"  # herd's own benchmark runs: traced, left out of the traffic analytics


def apps_of(call):
    """The apps a request counts under: its tags, else its client (User-Agent product and address)."""
    if call.tags:
        return call.tags
    product = call.user_agent.split(" ", 1)[0] if call.user_agent else "unknown client"
    return [f"{product} from {call.client_ip}"]


DECISION_SECONDS = ("wait", "load", "reload", "service", "slowdown", "eviction", "risk")


def decision_record(decision):
    """One routing decision as the trace stores it, compactly (decision_view reads it back): [model,
    chosen, [[node, score, eta, *DECISION_SECONDS, deferred, *signals, prompt s, cached tokens]...],
    [[node, why]...]]."""
    return [decision["model"], decision["chosen"],
            [[node_id, total, e["eta"], e["wait"], e["cold_load"] - e["reload"], e["reload"], e["service"],
              e["slowdown"], e["eviction"], e["risk"], e["defer"], *breakdown.values(), e["prompt"],
              e["cached_tokens"]]
             for node_id, e, breakdown, total in decision["candidates"]],
            decision["excluded"]]


def decision_view(record):
    """A stored decision for people: every candidate's expected seconds by cause and its seven
    signals, best first, and the nodes left out with the reason."""
    model, chosen, candidates, excluded = record
    signals = list(SIGNAL_SECONDS)
    width = len(DECISION_SECONDS)
    first_signal = 4 + width
    views = [{"node_id": c[0], "chosen": c[0] == chosen, "score": round(c[1], 2), "eta_s": round(c[2], 3),
              "deferred": bool(c[3 + width]),
              "seconds": {name: round(value, 3) for name, value in zip(DECISION_SECONDS, c[3:3 + width])},
              "signals": {name: round(value, 2) for name, value in zip(signals, c[first_signal:])},
              **({"prompt_s": round(c[first_signal + len(signals)], 3),
                  "cached_tokens": round(c[first_signal + len(signals) + 1])}
                 if len(c) > first_signal + len(signals) + 1 else {"prompt_s": None, "cached_tokens": None})}
             for c in candidates]
    return {"model": model, "chosen": chosen, "candidates": sorted(views, key=lambda c: -c["score"]),
            "excluded": [{"node_id": node_id, "reason": reason} for node_id, reason in excluded]}


class Exchange:
    """One client request from the door to its trace row.

    It carries the call, the attempt under way (the lease on a node's slot and the upstream
    connection, which the watchdog may cut) and the outcome the trace row reports. However the
    request ends (a buffered reply, a stream's end, the client gone, the upstream cut, an error
    before the first byte, a refusal), `finish()` ends it exactly once: it closes the upstream,
    gives the slot back, writes the trace row and drops the exchange from the running set."""

    def __init__(self, call, proxy):
        self.call = call
        self.proxy = proxy
        config = proxy.config
        # A non-streaming reply has no first byte until it is done: only the stall limit applies.
        self.first_byte_limit = config.first_byte_timeout if call.stream else config.stall_timeout
        self.idle_limit = config.idle_timeout
        self.stall_limit = config.stall_timeout
        self.lock = threading.Lock()
        self.ended = False
        self.lease = None
        self.upstream = None  # the node's streaming response while the relay reads it
        # the outcome, as the trace row reports it
        self.status = "failed"
        self.node_id = None
        self.model = call.model
        self.score = self.breakdown = self.queue_ms = None
        self.retries = 0
        self.ttft_ms = None
        self.error = None
        self.reply = ReplyStats()
        self.decisions = []  # the routing decision of each attempt
        self.events_streamed = 0  # OpenAI stream events relayed (a token count when usage is not sent)
        self.replied_at = None  # when a whole reply was handed to the server: it ends once written
        self._watch_afresh()

    # -- attempts -----------------------------------------------------------------------------

    def _watch_afresh(self):
        self.started = self.last_byte = time.monotonic()
        self.first_byte_at = None
        self.conn = None
        self.aborted = None
        self.cut_done = False

    def begin(self, lease):
        """A new attempt on the leased node."""
        self._watch_afresh()
        self.lease = lease
        if lease.decision is not None:
            self.decisions.append(lease.decision)
        self.node_id, self.model = lease.node_id, lease.model
        self.score, self.breakdown, self.queue_ms = lease.score, lease.breakdown, lease.queued_ms

    def abandon(self):
        """The attempt failed before its first byte: give its slot back; returns its lease."""
        lease, self.lease = self.lease, None
        self.detach()
        self.proxy.fleet.release(lease, served=False)
        return lease

    def first_byte(self):
        self.first_byte_at = self.last_byte = time.monotonic()
        if self.lease is not None:
            self.lease.answered = True  # read under the fleet's lock; a bool is set whole
        self.ttft_ms = (time.perf_counter() - self.call.started) * 1000

    # -- the watchdog's view ------------------------------------------------------------------

    @contextlib.contextmanager
    def watching(self):
        """While open, the connection this thread opens upstream is handed to this exchange."""
        _watched.exchange = self
        try:
            yield
        finally:
            _watched.exchange = None

    def attach(self, conn):
        with self.lock:
            self.conn = conn
            self.cut_done = False

    def detach(self):
        """The connection goes back to the pool: the watchdog must not touch it any more."""
        with self.lock:
            self.conn = None

    def abort(self, reason):
        with self.lock:
            if self.aborted is None:
                self.aborted = reason
                log.warning("request %s on %s: %s", self.call.request_id, self.node_id or "-", self.explain())
            self._cut()

    def _cut(self):
        sock = getattr(self.conn, "sock", None)
        if sock is not None and not self.cut_done:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.cut_done = True

    def check(self, now):
        """The watchdog's look at this request: cut it if it broke a limit."""
        if self.replied_at is not None:  # the server writes the reply and closes it, which ends it...
            if now - self.replied_at > self.stall_limit:  # ...unless something failed before the close
                log.warning("request %s: its reply was never written out; ending it", self.call.request_id)
                self.finish("failed", "herd's server failed to send the reply it had from the node")
            return
        if self.aborted is not None:
            with self.lock:
                self._cut()  # the connection may have opened after the abort
            return
        if self.call.client_gone():
            self.abort("cancelled")
        elif self.lease is None:
            return  # between attempts or queued: the admission queue keeps its own deadline
        elif self.first_byte_at is None and now - self.started > self.first_byte_limit:
            self.abort("first_byte_timeout")
        elif self.first_byte_at is not None and now - self.last_byte > self.idle_limit:
            self.abort("idle_timeout")
        elif now - self.last_byte > self.stall_limit:
            self.abort("reaped")

    def explain(self, exc=None):
        reasons = {"cancelled": "the client disconnected",
                   "first_byte_timeout": f"sent nothing for {self.first_byte_limit:g} s (first-byte timeout)",
                   "idle_timeout": f"went silent for {self.idle_limit:g} s mid-stream (idle timeout)",
                   "reaped": f"produced no byte for {self.stall_limit:g} s and was reaped",
                   "shutdown": "was cut short: herd is shutting down"}
        if self.aborted:
            return reasons[self.aborted]
        return f"broke off mid-stream ({describe(exc)})" if exc is not None else "failed"

    def failure(self, exc, what=None):
        """The UpstreamFailure for an error before the first byte."""
        node_id = self.lease.node_id
        if self.aborted and self.aborted != "cancelled":
            return UpstreamFailure(f"{node_id} {self.explain()}", status=504, timed_out=True)
        unreachable = isinstance(exc, urllib3.exceptions.NewConnectionError) or \
            isinstance(getattr(exc, "reason", None), urllib3.exceptions.NewConnectionError)
        text = describe(exc)
        return UpstreamFailure(f"{node_id}: {what + ' (' + text + ')' if what else text}",
                               unreachable=unreachable)

    # -- the end ------------------------------------------------------------------------------

    def finish(self, status, error=None, tail=b""):
        """End the request (once): close or reuse the upstream, give the slot back (learning from
        the reply when it completed), write the trace row, leave the running set."""
        with self.lock:
            if self.ended:
                return
            self.ended = True
            self.conn = None
        latency_ms = (time.perf_counter() - self.call.started) * 1000
        self.status, self.error = status, error
        completed = status == "completed"
        try:
            if tail:
                self.reply = read_reply(tail, self.ttft_ms, latency_ms, self.events_streamed)
            upstream, self.upstream = self.upstream, None
            if upstream is not None:
                if completed:
                    upstream.release_conn()
                else:
                    upstream.close()
            if self.lease is not None:
                timings = self.reply.timings if completed else None
                if timings is not None and "load_s" not in timings and self.call.stream and self.first_byte_at:
                    timings["first_byte_s"] = self.first_byte_at - self.started  # (an OpenAI stream)
                self.proxy.fleet.release(self.lease, served=completed, sent_ctx=sent_num_ctx(self.call),
                                         timings=timings)
        finally:  # the row and the running set, whatever went wrong above
            self.latency_ms, self.ended_at = latency_ms, time.time()
            self.proxy.traces.record(self)  # the writer thread builds its row (trace_row)
            self.proxy.drop(self)

    def fail(self, status, message, code, retry_after=None, outcome="failed"):
        """End the request with an error answer in the client's API shape."""
        self.finish(outcome, message)
        return error_response(self.call.api, status, message, code, retry_after)

    def trace_row(self):
        """The request_traces row, keyed by column (built by the trace writer once it has ended)."""
        call, reply, lease, latency_ms = self.call, self.reply, self.lease, self.latency_ms
        timings = reply.timings or {}
        load_s = timings.get("load_s")
        return {
            "request_id": call.request_id, "timestamp": self.ended_at,
            "model": (self.model or call.model or None) if self.node_id else None,  # served (or tried)
            "original_model": call.model, "node_id": self.node_id, "status": self.status,
            "latency_ms": round(latency_ms, 3),
            "time_to_first_token_ms": round(self.ttft_ms, 3) if self.ttft_ms is not None else None,
            "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "score": self.score, "scores_breakdown": json.dumps(self.breakdown) if self.breakdown else None,
            "retry_count": self.retries, "fallback_used": int(bool(self.model and self.model != call.model)),
            "api": call.api, "endpoint": call.endpoint, "tags": json.dumps(call.tags) if call.tags else None,
            "client_ip": call.client_ip, "error_message": self.error,
            "queue_ms": round(self.queue_ms, 3) if self.queue_ms else None, "stream": int(call.stream),
            "events": json.dumps(call.events) if call.events else None,
            "user_agent": call.user_agent or None, "apps": json.dumps(apps_of(call)),
            "eval_ms": round(timings["eval_s"] * 1000, 3) if timings.get("eval_s") else None,
            "prompt_eval_ms": round(timings["prompt_s"] * 1000, 3) if timings.get("prompt_s") else None,
            "load_ms": round(load_s * 1000, 3) if load_s is not None else None,
            "cold_load": int(load_s > HOT_LOAD_S) if load_s is not None else int(bool(lease and lease.cold)),
            "reload": int(bool(lease and lease.reload)),
            "decisions": json.dumps([decision_record(d) for d in self.decisions]) if self.decisions else None,
            "internal": int(BENCHMARK_TAG in call.tags),
        }


class Relay:
    """A stream from node to client. Its end, whatever it is (the node's last chunk, a node
    error, the server closing it because the client left, even before its first chunk), ends
    the exchange."""

    def __init__(self, exchange, chunks, first):
        self.exchange, self.chunks, self.first = exchange, chunks, first
        self.tail = first[-TAIL_BYTES:]
        self.status, self.error = "incomplete", None

    def __iter__(self):
        exchange, call = self.exchange, self.exchange.call
        try:
            yield self.first
            sse = call.api == "openai"
            if sse:
                exchange.events_streamed += self.first.count(b"data: ")
            for chunk in self.chunks:
                exchange.last_byte = time.monotonic()
                self.tail = (self.tail + chunk)[-TAIL_BYTES:]
                if sse:
                    exchange.events_streamed += chunk.count(b"data: ")
                yield chunk
            if reply_finished(call, self.tail):
                self.status = "completed"
            else:
                self.error = f"{exchange.node_id} closed the stream before it was done"
                yield stream_error_chunk(call.api, self.error)
        except UPSTREAM_ERRORS as exc:
            if exchange.aborted != "cancelled":
                self.status = "reaped" if exchange.aborted == "reaped" else "incomplete"
                self.error = f"{exchange.node_id} {exchange.explain(exc)}"
                yield stream_error_chunk(call.api, self.error)
        except Exception as exc:  # noqa: BLE001 - a bug must still end the stream in its API's shape
            log.exception("request %s: relay failed", call.request_id)
            self.status, self.error = "incomplete", f"herd hit an internal error ({type(exc).__name__})"
            yield stream_error_chunk(call.api, self.error)
        finally:
            self.close()

    def close(self):
        status, error = self.status, self.error
        if status != "completed" and (error is None or self.exchange.aborted == "cancelled"):
            status, error = "cancelled", "the client disconnected"
        self.exchange.finish(status, error, self.tail)


class Proxy:
    """Carries each exchange through its attempts: admission, upstream, first byte, the reply."""

    def __init__(self, fleet, traces, config, settings, pulls, capabilities):
        self.fleet = fleet
        self.traces = traces
        self.config = config
        self.settings = settings  # runtime settings (dashboard), read on each request
        self.pulls = pulls
        self.capabilities = capabilities
        # urllib3 (the pool under requests) directly: one pooled connection per in-flight request,
        # no per-call Session overhead on the hot path. Its read timeout is only a backstop: the
        # watchdog enforces each phase's own limit.
        self.pool = urllib3.PoolManager(
            num_pools=256, maxsize=config.threads, block=False, retries=False,
            timeout=urllib3.Timeout(connect=config.connect_timeout,
                                    read=max(config.first_byte_timeout, config.stall_timeout) + 30))
        self.pool.pool_classes_by_scheme = {"http": WatchedHTTPPool, "https": WatchedHTTPSPool}
        self.exchanges = set()
        self.lock = threading.Lock()
        self.max_active = max(1, config.threads - max(THREAD_RESERVE_MIN, config.threads // THREAD_RESERVE_SHARE))

    # -- entry ------------------------------------------------------------------------------

    def serve(self, call, admit=True):
        """Answer one parsed call with a Flask response; never raises."""
        exchange = Exchange(call, self)
        with self.lock:
            overloaded = len(self.exchanges) >= self.max_active
            if not overloaded:
                self.exchanges.add(exchange)
        if overloaded:
            return exchange.fail(503, f"herd is serving its maximum of {self.max_active} requests; retry "
                                 "shortly or start herd with more --threads", "overloaded", retry_after=1)
        try:
            self.spell(call)
            return self._attempts(exchange, admit)
        except BaseException as exc:
            exchange.finish("failed", f"herd hit an internal error ({type(exc).__name__})")
            raise

    def spell(self, call):
        """Models named in another case than a node has them are sent as the node spells them."""
        spelled = self.fleet.spelling(call.model)
        if spelled != call.model:
            call.body["model" if call.body.get("model") else "name"] = call.model = call.asked_name = spelled
            call.edited = True
        call.fallback_models = [self.fleet.spelling(m) for m in call.fallback_models]

    def refuse(self, api, endpoint, client_ip, request_id, message, outcome="failed", user_agent=""):
        """Trace a request answered without being served (refused at the door, no such route):
        every client request has a row."""
        call = Call(api=api, endpoint=endpoint, body={}, raw=b"", model="", stream=False,
                    fallback_models=[], tags=[], client_ip=client_ip, request_id=request_id,
                    started=time.perf_counter(), user_agent=user_agent)
        Exchange(call, self).finish(outcome, message)

    def drop(self, exchange):
        with self.lock:
            self.exchanges.discard(exchange)

    def running(self):
        with self.lock:
            return list(self.exchanges)

    # -- attempts ----------------------------------------------------------------------------

    def _attempts(self, exchange, admit):
        """Attempt after attempt until one answers: the next-best nodes at once (up to
        max_retries more), then, while every node that could serve it is resting, the first to
        recover, until the queue deadline. A node that fails this request again (an error answer,
        or hanging up on it) after serving others meanwhile has said no to the request, not
        failed: then herd gives up."""
        call = exchange.call
        deadline = time.monotonic() + self.config.queue_timeout
        attempts = 0
        last_failure = None
        served_when_failed = {}  # node id -> requests it had served when it failed this one
        while True:
            try:
                lease = self._lease(call, admit, deadline)
            except RoutingError as exc:
                return self._give_up(exchange, exc, last_failure)
            exchange.begin(lease)
            attempts += 1
            try:
                return self._forward(exchange, lease)
            except UpstreamFailure as failure:
                exchange.abandon()
                if exchange.aborted == "cancelled":
                    return exchange.fail(499, "the client disconnected", "cancelled", outcome="cancelled")
                if exchange.aborted == "shutdown":
                    return exchange.fail(503, "herd is shutting down; retry in a few seconds", "shutting_down",
                                         retry_after=5)
                self.fleet.note_failure(lease, str(failure), failure.unreachable)
                last_failure = failure
                served = self.fleet.served_count(lease.node_id)
                got_it = not failure.unreachable and not failure.timed_out  # (it answered, or hung up on it)
                refused_again = got_it and served_when_failed.get(lease.node_id, served) < served
                served_when_failed[lease.node_id] = served
                retry = not call.pin and not refused_again and (attempts <= self.config.max_retries
                                                                 or time.monotonic() < deadline)
                call.note({"failed": lease.node_id, "reason": str(failure), "retried": retry})
                log.warning("request %s: %s failed before its first byte (%s); %s", call.request_id,
                            lease.node_id, failure, "giving up" if not retry else "retrying"
                            if attempts <= self.config.max_retries else "waiting for a node to recover")
                if not retry:
                    return self._give_up(exchange, None, failure)
                exchange.retries += 1

    def _lease(self, call, admit, deadline):
        """A lease for the call: the pinned node, the fleet's best, or a stand-in model."""
        if call.pin:
            return self.fleet.pin(call.pin, call.model)
        if not self.settings.get("prompt_affinity"):
            call.prefix = Prefix()  # routing without the prompt caches (the setting, for comparisons)
        try:
            return self.fleet.acquire(call, admit, deadline)
        except RoutingError as exc:
            if not admit:
                raise
            if exc.code == "model_too_large" and self.settings.get("vram_fallback"):
                substitute = vram_substitute(call, self.fleet.loaded_models(), self.capabilities)
                if substitute is None:
                    raise RoutingError(507, f"{exc.message}, and no loaded model of the same kind "
                                       f"({', '.join(sorted(required_capabilities(call)))}) can stand in",
                                       exc.code) from None
                call.substitute = substitute
                call.note({"vram_fallback": substitute})
                log.info("request %s: %s fits no node; serving loaded %s instead", call.request_id,
                         call.model, substitute)
                return self.fleet.acquire(call, admit, deadline)
            may_pull = call.may_change_fleet or bool(self.config.api_key) or is_loopback(call.client_ip)
            if (exc.code == "model_not_found" and self.settings.get("auto_pull") and may_pull
                    and is_model_reference(call.model)):
                message = self.pulls.ensure(call.model, self.fleet)
                if message:
                    call.note({"auto_pull": message})
                    raise RoutingError(404, f"{exc.message.split(' Pull it with')[0]} {message}",
                                       "model_not_found") from None
            raise

    def _give_up(self, exchange, routing_error, upstream_failure):
        """Answer with the routing error, or with the last node failure when nodes ran out."""
        call = exchange.call
        if routing_error is None or (upstream_failure is not None
                                     and routing_error.code in ("queue_timeout", "nodes_failing")):
            message = (f"every node that could serve {call.model} failed (last: {upstream_failure})"
                       + ("; none recovered in time" if routing_error and routing_error.code == "queue_timeout" else "")
                       + "; check the nodes' Ollama logs or retry")
            status = 504 if upstream_failure.timed_out else upstream_failure.status
            outcome = "reaped" if exchange.aborted == "reaped" else "failed"
            return exchange.fail(status, message, "upstream_failed", outcome=outcome)
        exchange.node_id = None
        return exchange.fail(routing_error.status, routing_error.message, routing_error.code,
                             routing_error.retry_after,
                             outcome="cancelled" if routing_error.code == "cancelled" else "failed")

    # -- one attempt ------------------------------------------------------------------------

    def _forward(self, exchange, lease):
        """Send to the leased node; return the client's response once the node has answered."""
        call = exchange.call
        body = body_for(call, lease, self.fleet.context_policy)
        if lease.held and call.endpoint in INFERENCE_ENDPOINTS:
            self.fleet.note_sent(lease, None if call.api == "openai" else sent_num_ctx(call), call.options(),
                                 call.prefix)
        try:
            with exchange.watching():
                resp = self.pool.urlopen(call.method, lease.url + call.endpoint, body=body,
                                         headers={"Content-Type": "application/json"},
                                         preload_content=False, redirect=False)
        except UPSTREAM_ERRORS as exc:
            raise exchange.failure(exc) from None
        headers = {"X-Herd-Node": header_safe(lease.node_id), "X-Herd-Model": header_safe(lease.model)}
        for key, value in resp.headers.items():
            if key.lower() not in HOP_BY_HOP and not (key.lower() == "content-encoding" and value.lower() in DECODED):
                headers.setdefault(key, value)  # (a body urllib3 decodes goes on decoded: herd reads it)

        if resp.status >= 300 or not call.stream:
            try:
                data = resp.read()
            except UPSTREAM_ERRORS as exc:
                exchange.detach()
                resp.close()
                raise exchange.failure(exc, "broke before its reply was complete") from None
            exchange.detach()
            resp.release_conn()
            if resp.status >= 500:
                raise UpstreamFailure(f"{lease.node_id} answered {resp.status}: {upstream_message(data)}",
                                      status=resp.status if resp.status < 600 else 502)
            if 300 <= resp.status < 400:  # not Ollama's: a proxy in front of it; its target is not a node
                raise UpstreamFailure(f"{lease.node_id} answered {resp.status}, a redirect to "
                                      f"{header_safe(resp.headers.get('Location') or 'nowhere')}; give herd the "
                                      "node's final URL")
            if resp.status >= 400:
                message = upstream_message(data)
                if not in_api_shape(data, call.api):
                    data = json.dumps(error_body(call.api, resp.status, message, "upstream_error")).encode()
                headers["Content-Type"] = "application/json"
                exchange.finish("failed", message)
                return Response(data, status=resp.status, headers=headers)
            # the client has its reply before herd learns from it and queues its row: Waitress
            # closes the response once the body is written, whatever became of the client (should
            # something fail before that, the watchdog ends the exchange after the stall limit)
            response = Response(data, status=resp.status, headers=headers)
            exchange.replied_at, tail = time.monotonic(), data[-TAIL_BYTES:]
            response.call_on_close(lambda: exchange.finish("completed", tail=tail))
            return response

        chunks = upstream_chunks(resp)
        try:
            first = next(chunks, b"")
        except UPSTREAM_ERRORS as exc:
            exchange.detach()
            resp.close()
            raise exchange.failure(exc, "failed before its first byte") from None
        exchange.first_byte()
        exchange.upstream = resp
        headers["X-Accel-Buffering"] = "no"
        headers["Cache-Control"] = "no-cache"
        return Response(Relay(exchange, chunks, first), status=resp.status, headers=headers,
                        direct_passthrough=True)



# =============================================================================================
# Analytics: the figures the dashboard shows, from the trace store
# =============================================================================================
#
# Every figure is computed from request_traces (and, for the dashboard, the fleet's state), for
# the range asked. Short ranges are read from the rows themselves. Longer ones would read up to a
# million rows, so the trace writer also keeps hourly rollups (request_rollups: counts, sums and
# latency histograms per hour, model, node, app and API) in the same transaction as the rows; a
# long range reads the rollups of its whole hours and the rows of the partial hours at either
# end. Percentiles come from log-spaced histograms whose bins are 10% apart. herd's own benchmark
# runs (tag herd:benchmark) are traced but left out of every figure here.

RAW_RANGE_S = 3 * 3600  # ranges up to this long are read row by row
BIN_RATIO = 1.1  # histogram bins: each 10% wider than the last...
BIN_FLOOR_MS = 0.1  # ...from a tenth of a millisecond
TALLY_COUNTS = ("requests", "errors", "failed", "cancelled", "incomplete", "reaped", "retried", "retries",
                "fallbacks", "cold_loads", "reloads", "tokens_in", "tokens_out", "eval_tokens", "eval_ms",
                "prompt_timed_tokens", "prompt_ms", "load_count", "load_ms", "queue_ms")
ROLLUP_KEY = ("hour", "model", "node_id", "app", "api")
ROLLUP_COLUMNS = {**{name: "INTEGER" if name in ("hour",) else "TEXT" for name in ROLLUP_KEY},
                  **{name: "REAL" if name.endswith("_ms") else "INTEGER" for name in TALLY_COUNTS},
                  "last_used": "REAL", "latency_bins": "TEXT", "ttft_bins": "TEXT"}
TRACE_FIELDS = ("timestamp", "model", "original_model", "node_id", "api", "status", "latency_ms", "time_to_first_token_ms",
                "prompt_tokens", "completion_tokens", "retry_count", "fallback_used", "cold_load", "reload",
                "eval_ms", "prompt_eval_ms", "load_ms", "queue_ms", "apps")
ANALYZED = "(internal IS NULL OR internal = 0)"  # rows of client traffic (not herd's own benchmarks)


def latency_bin(ms):
    return int(math.log(max(ms, BIN_FLOOR_MS) / BIN_FLOOR_MS) / math.log(BIN_RATIO))


def bin_middle(index):
    return BIN_FLOOR_MS * BIN_RATIO ** (index + 0.5)


def histogram_percentile(bins, q):
    """The q-th percentile (nearest rank) of a {bin: count} histogram, or None when empty."""
    total = sum(bins.values())
    if not total:
        return None
    rank, seen = math.ceil(q / 100 * total), 0
    for index in sorted(bins):
        seen += bins[index]
        if seen >= rank:
            return round(bin_middle(index), 1)
    return None


class Tally:
    """Counts, sums and latency histograms of a set of requests: trace rows and rollups add alike."""

    __slots__ = ("counts", "latency", "ttft", "last_used")

    def __init__(self):
        self.counts = dict.fromkeys(TALLY_COUNTS, 0)
        self.latency, self.ttft = collections.Counter(), collections.Counter()
        self.last_used = None

    def add_row(self, row):
        """One request_traces row (a mapping with TRACE_FIELDS)."""
        c = self.counts
        status = row["status"]
        c["requests"] += 1
        if status != "completed":
            c["errors"] += 1
            if status in ("failed", "cancelled", "incomplete", "reaped"):
                c[status] += 1
        retries = row["retry_count"] or 0
        c["retried"] += retries > 0
        c["retries"] += retries
        c["fallbacks"] += row["fallback_used"] or 0
        c["cold_loads"] += row["cold_load"] or 0
        c["reloads"] += row["reload"] or 0
        c["tokens_in"] += row["prompt_tokens"] or 0
        c["tokens_out"] += row["completion_tokens"] or 0
        if row["eval_ms"] and row["completion_tokens"]:
            c["eval_tokens"] += row["completion_tokens"]
            c["eval_ms"] += row["eval_ms"]
        if row["prompt_eval_ms"] and row["prompt_tokens"]:
            c["prompt_timed_tokens"] += row["prompt_tokens"]
            c["prompt_ms"] += row["prompt_eval_ms"]
        if row["cold_load"] and row["load_ms"]:
            c["load_count"] += 1
            c["load_ms"] += row["load_ms"]
        c["queue_ms"] += row["queue_ms"] or 0
        if row["latency_ms"] is not None:
            self.latency[latency_bin(row["latency_ms"])] += 1
        if row["time_to_first_token_ms"] is not None:
            self.ttft[latency_bin(row["time_to_first_token_ms"])] += 1
        self.last_used = max(self.last_used or 0, row["timestamp"])

    def add_tally(self, other):
        for key, value in other.counts.items():
            self.counts[key] += value
        self.latency.update(other.latency)
        self.ttft.update(other.ttft)
        if other.last_used is not None:
            self.last_used = max(self.last_used or 0, other.last_used)

    def add_rollup(self, row):
        """One request_rollups row (its histograms stored as [[bin, count], ...])."""
        counts = self.counts
        for key in TALLY_COUNTS:
            counts[key] += row[key] or 0
        for histogram, column in ((self.latency, "latency_bins"), (self.ttft, "ttft_bins")):
            for index, count in json.loads(row[column] or "[]"):
                histogram[index] += count
        if row["last_used"] is not None:
            self.last_used = max(self.last_used or 0, row["last_used"])

    def rollup_values(self):
        return {**self.counts, "last_used": self.last_used, "latency_bins": json.dumps(sorted(self.latency.items())),
                "ttft_bins": json.dumps(sorted(self.ttft.items()))}

    def view(self):
        """The figures a person reads: counts, percentiles (ms), speeds (tokens/s), load time (s)."""
        c = self.counts
        return {"requests": c["requests"], "errors": c["errors"],
                "latency_p50_ms": histogram_percentile(self.latency, 50),
                "latency_p95_ms": histogram_percentile(self.latency, 95),
                "ttft_p50_ms": histogram_percentile(self.ttft, 50), "ttft_p95_ms": histogram_percentile(self.ttft, 95),
                "tokens_in": c["tokens_in"], "tokens_out": c["tokens_out"],
                "decode_tps": round(c["eval_tokens"] / c["eval_ms"] * 1000, 1) if c["eval_ms"] else None,
                "prompt_tps": round(c["prompt_timed_tokens"] / c["prompt_ms"] * 1000, 1) if c["prompt_ms"] else None,
                "load_s": round(c["load_ms"] / c["load_count"] / 1000, 2) if c["load_count"] else None,
                "cold_loads": c["cold_loads"], "reloads": c["reloads"], "retries": c["retries"],
                "retried": c["retried"], "fallbacks": c["fallbacks"], "failed": c["failed"],
                "cancelled": c["cancelled"], "incomplete": c["incomplete"], "reaped": c["reaped"],
                "last_used": self.last_used}


def rollup_keys(row):
    """The rollup rows one trace row counts in: its hour, model, node and API, once for all apps
    (app '') and once under each app it belongs to."""
    hour = int(row["timestamp"] // 3600 * 3600)
    base = (hour, row["model"] or row["original_model"] or "", row["node_id"] or "", row["api"] or "")
    apps = json.loads(row["apps"]) if row["apps"] else []
    return [(base[0], base[1], base[2], app, base[3]) for app in ["", *apps]]


def roll_up(db, rows):
    """Fold trace rows into request_rollups (the trace writer, once their hour has ended)."""
    tallies = collections.defaultdict(Tally)
    for row in rows:
        if row["internal"]:
            continue
        for key in rollup_keys(row):
            tallies[key].add_row(row)
    cursor = db.cursor()
    cursor.row_factory = sqlite3.Row
    for key, tally in tallies.items():
        stored = cursor.execute(f"SELECT * FROM request_rollups WHERE {' AND '.join(f'{k} = ?' for k in ROLLUP_KEY)}",
                                key).fetchone()
        if stored is not None:
            tally.add_rollup(stored)
        values = {**dict(zip(ROLLUP_KEY, key)), **tally.rollup_values()}
        db.execute(f"INSERT OR REPLACE INTO request_rollups ({', '.join(values)}) "
                   f"VALUES ({', '.join(':' + k for k in values)})", values)


def roll_up_day(db, day):
    """Add a day's hourly rollups up into request_rollups_daily (hour = the day's start)."""
    cursor = db.cursor()
    cursor.row_factory = sqlite3.Row
    tallies = collections.defaultdict(Tally)
    for row in cursor.execute("SELECT * FROM request_rollups WHERE hour >= ? AND hour < ?", (day, day + 86400)):
        tallies[(day, row["model"], row["node_id"], row["app"], row["api"])].add_rollup(row)
    for key, tally in tallies.items():
        values = {**dict(zip(ROLLUP_KEY, key)), **tally.rollup_values()}
        db.execute(f"INSERT OR REPLACE INTO request_rollups_daily ({', '.join(values)}) "
                   f"VALUES ({', '.join(':' + k for k in values)})", values)


class Analytics:
    """Read-only queries over the trace store for the dashboard, the CLI and /metrics."""

    def __init__(self, store):
        self.store = store

    def rows(self, sql, params=()):
        with self.store.connect_readonly() as db:
            db.row_factory = sqlite3.Row
            return db.execute(sql, params).fetchall()

    def tallies(self, since, until, key, resolution=None):
        """{group: Tally} of the client requests in [since, until), grouped by `key`: a function of
        (time: a rollup's hour or day, or a row's timestamp; model, node_id, app, api) -> a group,
        or None to leave it out.
        `key.apps` True groups by app (a request counts under each of its apps). Whole days come
        from daily rollups (unless `resolution`, the seconds a group spans, is finer than a day),
        whole hours from hourly ones, the partial hours at the ends from the rows themselves."""
        by_app = getattr(key, "apps", False)
        groups = collections.defaultdict(Tally)
        raw_spans = [(since, until)]
        if until - since > RAW_RANGE_S:
            rolled = self.rows("SELECT rolled_until FROM rollup_progress")
            first = math.ceil(since / 3600) * 3600
            last = max(first, min(math.floor(until / 3600) * 3600, rolled[0][0] if rolled else first))
            raw_spans = [(since, first), (last, until)]
            hourly = [(first, last)]
            if resolution is None or resolution % 86400 == 0:
                first_day, last_day = math.ceil(first / 86400) * 86400, math.floor(last / 86400) * 86400
                if last_day > first_day:
                    hourly = [(first, first_day), (last_day, last)]
                    self._add_rollups(groups, key, by_app, "request_rollups_daily", first_day, last_day)
            for start, end in hourly:
                self._add_rollups(groups, key, by_app, "request_rollups", start, end)
        for start, end in raw_spans:
            if end <= start:
                continue
            for row in self.rows(f"SELECT {', '.join(TRACE_FIELDS)} FROM request_traces "
                                 f"WHERE timestamp >= ? AND timestamp < ? AND {ANALYZED}", (start, end)):
                apps = json.loads(row["apps"]) if by_app and row["apps"] else [""]
                for app in apps:
                    group = key(row["timestamp"], row["model"] or row["original_model"] or "", row["node_id"] or "",
                                app, row["api"])
                    if group is not None:
                        groups[group].add_row(row)
        return groups

    def _add_rollups(self, groups, key, by_app, table, start, end):
        if end <= start:
            return
        app_clause = "app != ''" if by_app else "app = ''"
        for row in self.rows(f"SELECT * FROM {table} WHERE hour >= ? AND hour < ? AND {app_clause}", (start, end)):
            group = key(row["hour"], row["model"], row["node_id"], row["app"], row["api"])
            if group is not None:
                groups[group].add_rollup(row)

    def last_used(self, pairs):
        """{(node_id, model): when it last served a client request, or None} for each pair, on one
        connection (a node with thousands of models asks thousands of times)."""
        sql = f"SELECT MAX(timestamp) FROM request_traces WHERE node_id = ? AND model = ? AND {ANALYZED}"
        with contextlib.closing(self.store.connect_readonly()) as db:
            return {pair: db.execute(sql, pair).fetchone()[0] for pair in pairs}

    def longest_gap_before_load(self, node_id, model, span):
        """The longest idle time before a request that had to load `model` on `node_id`: the
        keep_alive that would have kept it loaded for all of them."""
        rows = self.rows(f"""SELECT MAX(timestamp - (SELECT MAX(before.timestamp) FROM request_traces before
                                WHERE before.node_id = loads.node_id AND before.model = loads.model
                                AND before.timestamp < loads.timestamp AND {ANALYZED.replace('internal', 'before.internal')}))
                             FROM request_traces loads WHERE node_id = ? AND model = ? AND cold_load = 1
                             AND timestamp >= ? AND {ANALYZED}""", (node_id, model, span["since"]))
        return rows[0][0] if rows else None


def grouped(function, apps=False):
    """A tallies() key function, marked for grouping by app when `apps`."""
    function.apps = apps
    return function


# =============================================================================================
# Trace store: one row per client request, written by one thread in batches (SQLite, WAL)
# =============================================================================================

TRACE_COLUMNS = {
    "request_id": "TEXT", "timestamp": "REAL", "model": "TEXT", "original_model": "TEXT",
    "node_id": "TEXT", "status": "TEXT", "latency_ms": "REAL", "time_to_first_token_ms": "REAL",
    "prompt_tokens": "INTEGER", "completion_tokens": "INTEGER", "score": "REAL",
    "scores_breakdown": "TEXT", "retry_count": "INTEGER", "fallback_used": "INTEGER",
    "api": "TEXT", "endpoint": "TEXT", "tags": "TEXT", "client_ip": "TEXT",
    "error_message": "TEXT", "queue_ms": "REAL", "stream": "INTEGER", "events": "TEXT",
    "user_agent": "TEXT", "apps": "TEXT", "eval_ms": "REAL", "prompt_eval_ms": "REAL", "load_ms": "REAL",
    "cold_load": "INTEGER", "reload": "INTEGER", "decisions": "TEXT", "internal": "INTEGER",
}
# Rows per transaction: a few µs a row on the request path, where committing each row from its
# own request thread costs milliseconds and stalls under load.
TRACE_BATCH = 500
TRACE_QUEUE = 100_000  # rows buffered before request threads wait for the writer (none are dropped)
# A batch gathers rows for this long: a commit and a wake-up of the writer per 50 ms, not per row
# (a kill -9 can lose at most these; a clean shutdown or flush() writes at once).
TRACE_WAIT_S = 0.05
PRUNE_EVERY_S = 3600.0
ROLLUP_EVERY_S = 60.0  # how often the writer looks for an hour to roll up
ROLLUP_GRACE_S = 60.0  # an hour is rolled up this long after it ends: its last rows are written by then
ROLLUP_HOURS_PER_PASS = 48  # catching up on old rows, the writer stops to write new ones this often


def escaped_row(row):
    """A trace row that SQLite will take whatever it held: text with lone surrogates escaped,
    numbers too large for SQLite as text, anything else as its ASCII picture."""
    def safe(value):
        if value is None or isinstance(value, float):
            return value
        if isinstance(value, int):
            return value if -(1 << 63) <= value < (1 << 63) else str(value)
        if isinstance(value, str):
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return ascii(value)
    return {key: safe(row.get(key)) for key in TRACE_COLUMNS}


class TraceStore:
    """Owns latency.db: the writer thread, retention, settings and read-only queries."""

    def __init__(self, path, retention_days):
        self.path = Path(path)
        self.retention_days = retention_days
        self.queue = queue.Queue(maxsize=TRACE_QUEUE)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            columns = ", ".join(f"{name} {kind}" for name, kind in TRACE_COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS request_traces ({columns})")
            have = {row[1] for row in db.execute("PRAGMA table_info(request_traces)")}
            for name, kind in TRACE_COLUMNS.items():  # an older database gains new columns in place
                if name not in have:
                    db.execute(f"ALTER TABLE request_traces ADD COLUMN {name} {kind}")
            db.execute("CREATE INDEX IF NOT EXISTS traces_time ON request_traces (timestamp)")
            db.execute("CREATE INDEX IF NOT EXISTS traces_id ON request_traces (request_id)")
            db.execute("CREATE INDEX IF NOT EXISTS traces_node_model ON request_traces (node_id, model, timestamp)")
            db.execute("CREATE INDEX IF NOT EXISTS traces_cold_loads ON request_traces (node_id, model, timestamp) "
                       "WHERE cold_load = 1")
            db.execute("CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT)")
            columns = ", ".join(f"{name} {kind}" for name, kind in ROLLUP_COLUMNS.items())
            for table in ("request_rollups", "request_rollups_daily"):  # by the hour; by the (UTC) day
                db.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns}, PRIMARY KEY ({', '.join(ROLLUP_KEY)}))")
            db.execute("CREATE TABLE IF NOT EXISTS rollup_progress (id INTEGER PRIMARY KEY, rolled_until INTEGER)")
            db.execute("CREATE TABLE IF NOT EXISTS benchmark_runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "node_id TEXT, model TEXT, started REAL, result TEXT)")
        self.listeners = []  # called with the rows of each batch written (metrics)
        self.insert = (f"INSERT INTO request_traces ({', '.join(TRACE_COLUMNS)}) "
                       f"VALUES ({', '.join(':' + name for name in TRACE_COLUMNS)})")
        self.thread = threading.Thread(target=self._write_loop, name="herd-traces", daemon=True)
        self.thread.start()

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def connect_readonly(self):
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)

    def record(self, item):
        """Queue one row: a dict keyed by TRACE_COLUMNS, or an ended request whose trace_row() the
        writer builds (off the request's thread). Blocks only if the writer is far behind."""
        self.queue.put(item)

    def _write_loop(self):
        db = self._connect()
        next_prune = 0.0
        next_roll_up = 0.0
        while True:
            if time.time() >= next_roll_up:
                next_roll_up = time.time() + ROLLUP_EVERY_S
                try:
                    if self._roll_up_hours(db):
                        next_roll_up = time.time()  # behind: more after this batch
                except Exception:  # noqa: BLE001 - analytics must not stop rows being written
                    log.exception("could not roll up trace rows")
            try:
                batch = [self.queue.get(timeout=max(0.0, next_roll_up - time.time()))]
            except queue.Empty:
                continue
            self._gather(batch)
            stop = any(item is None for item in batch)
            try:
                rows = self._rows(batch)
                if rows:
                    self._write(db, rows)
                    for listener in self.listeners:
                        listener(rows)
                if time.time() >= next_prune:
                    next_prune = time.time() + PRUNE_EVERY_S
                    self._prune(db)
            except Exception:  # noqa: BLE001 - the writer must outlive any one bad batch
                log.exception("trace writer hit an error; it goes on")
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
            if stop:
                db.close()
                return

    @staticmethod
    def _rows(batch):
        """The rows of a batch; a request whose row cannot be built is logged, not lost silently."""
        rows = []
        for item in batch:
            if item is None or isinstance(item, threading.Event):
                continue
            try:
                rows.append(item if isinstance(item, dict) else item.trace_row())
            except Exception:  # noqa: BLE001 - one odd request must not cost the batch its rows
                log.exception("could not build the trace row of %s", ascii(getattr(item, "call", None)))
        return rows

    def _gather(self, batch):
        """Add to `batch` what arrives in the next TRACE_WAIT_S, up to TRACE_BATCH items. The
        writer sleeps meanwhile rather than wake for every row."""
        if batch[0] is not None and not isinstance(batch[0], threading.Event):
            time.sleep(TRACE_WAIT_S)
        while len(batch) < TRACE_BATCH:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                return

    def _write(self, db, rows):
        """Commit rows in one transaction; if that fails for a reason other than a busy database,
        row by row, a row that still fails written with its text escaped (never dropped unseen)."""
        for attempt in range(5):
            try:
                with db:
                    db.executemany(self.insert, rows)
                return
            except sqlite3.OperationalError as exc:  # locked by a reader: try again, keep rows
                log.warning("trace write failed (%s), retrying", exc)
                time.sleep(0.2 * (attempt + 1))
            except (sqlite3.Error, ValueError, TypeError, OverflowError):
                break
        for row in rows:
            for candidate in (row, escaped_row(row)):
                try:
                    with db:
                        db.execute(self.insert, candidate)
                    break
                except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
                    log.warning("trace row %s could not be written as it was (%s)",
                                ascii(row.get("request_id")), exc)
            else:
                log.error("trace row %s was lost: %s", ascii(row.get("request_id")), ascii(row)[:500])

    def _roll_up_hours(self, db):
        """Fold each hour that has ended (a minute ago, so no row of it is still on its way) into
        request_rollups, once: hours before `rolled_until` are done; each day that ends, into
        request_rollups_daily. A database from before rollups existed gains them, a couple of
        days per pass (the writer comes back at once while it is behind). Returns True when
        hours remain."""
        row = db.execute("SELECT rolled_until FROM rollup_progress").fetchone()
        if row is None:
            first = db.execute("SELECT MIN(timestamp) FROM request_traces").fetchone()[0]
            rolled_until = int((first if first is not None else time.time()) // 3600 * 3600)
        else:
            rolled_until = row[0]
        end = int((time.time() - ROLLUP_GRACE_S) // 3600 * 3600)
        cursor = db.cursor()
        cursor.row_factory = sqlite3.Row
        for _ in range(ROLLUP_HOURS_PER_PASS):
            if rolled_until >= end:
                return False
            hour_rows = cursor.execute(f"SELECT {', '.join(TRACE_FIELDS)}, internal FROM request_traces "
                                       "WHERE timestamp >= ? AND timestamp < ?", (rolled_until, rolled_until + 3600))
            with db:
                roll_up(db, hour_rows.fetchall())
                rolled_until += 3600
                if rolled_until % 86400 == 0:
                    roll_up_day(db, rolled_until - 86400)
                db.execute("INSERT OR REPLACE INTO rollup_progress (id, rolled_until) VALUES (1, ?)", (rolled_until,))
        return rolled_until < end

    def _prune(self, db):
        cutoff = time.time() - self.retention_days * 86400
        with db:
            db.execute("DELETE FROM request_rollups WHERE hour < ?", (cutoff // 3600 * 3600,))
            db.execute("DELETE FROM request_rollups_daily WHERE hour < ?", (cutoff // 86400 * 86400,))
            removed = db.execute("DELETE FROM request_traces WHERE timestamp < ?", (cutoff,)).rowcount
        if removed:
            log.info("pruned %d trace rows older than %g days", removed, self.retention_days)

    def flush(self, timeout=10.0):
        """Wait until every row queued so far is committed."""
        done = threading.Event()
        self.queue.put(done)
        return done.wait(timeout)

    def close(self):
        """Write every queued row, then stop the writer (clean shutdown loses nothing)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join(timeout=30)

    def query(self, sql, params=()):
        with self._connect() as db:
            return db.execute(sql, params).fetchall()

    def save_benchmark(self, result):
        with self._connect() as db:
            return db.execute("INSERT INTO benchmark_runs (node_id, model, started, result) VALUES (?, ?, ?, ?)",
                              (result["node_id"], result["model"], result["started"], json.dumps(result))).lastrowid

    def benchmark_runs(self, limit=50):
        runs = self.query("SELECT run_id, result FROM benchmark_runs ORDER BY run_id DESC LIMIT ?", (limit,))
        return [dict(json.loads(result), run_id=run_id) for run_id, result in runs]

    def load_settings(self):
        values = dict(RUNTIME_SETTINGS)
        for key, value in self.query("SELECT key, value FROM settings"):
            if key in values:
                values[key] = json.loads(value)
        return values

    def save_settings(self, changes):
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                           [(key, json.dumps(value)) for key, value in changes.items()])


# -- logs: lines for people on the console, JSON lines for machines in the data dir ----------

class JsonLines(logging.Formatter):
    """One JSON object a line, for <data dir>/logs/herd.jsonl."""

    def format(self, record):
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(data_dir, level):
    """Console lines for people, rotated JSONL for machines. Safe to call more than once."""
    logs = Path(data_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log.setLevel(level.upper())
    for handler in list(log.handlers):
        if getattr(handler, "herd", False):
            log.removeHandler(handler)
            handler.close()
    jsonl = logging.handlers.RotatingFileHandler(logs / "herd.jsonl", maxBytes=10 * 1024 * 1024,
                                                 backupCount=5, encoding="utf-8")
    jsonl.setFormatter(JsonLines())
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s herd %(levelname)s %(message)s", "%H:%M:%S"))
    for handler in (jsonl, console):
        handler.herd = True
        log.addHandler(handler)
    log.propagate = False


# =============================================================================================
# Dashboard API: what /dashboard/api/* answers, computed from the trace store and fleet state
# =============================================================================================
#
# Aggregating endpoints take ?hours=N (default 24) or ?since=<unix seconds> and echo the range
# they used; empty data gives empty lists. Health findings and recommendations each carry the
# numbers behind them; their thresholds are named here with the reason for each.

TRACE_LIMIT_DEFAULT, TRACE_LIMIT_MAX = 20, 1000
# usage buckets by range: up to 1 h by the minute, 3 h by 5 min, 2 days by the hour, then 6 h, 1 day
USAGE_BUCKETS = ((3600, 60), (3 * 3600, 300), (48 * 3600, 3600), (8 * 86400, 6 * 3600), (float("inf"), 86400))
FLAPPING_RETURNS = 3  # a node back online this many times in an hour is flapping, not just rebooted
MEMORY_PRESSURE = 0.10  # less than this share of a node's memory available: it will swap or evict
THRASHING_LOADS = 4  # cold loads of one model on one node in the range: it keeps being pushed out
CONTEXT_RELOADS = 3  # reloads for a larger num_ctx in the range: clients disagree on num_ctx
MIN_REQUESTS_FOR_RATES = 20  # fewer requests than this say nothing reliable about rates
ERROR_RATE_WARNING, ERROR_RATE_CRITICAL = 0.05, 0.20  # one in twenty requests failing is noticeable
RETRY_RATE_WARNING = 0.10  # a tenth of requests needing another node: something keeps failing
CANCEL_RATE_INFO = 0.20  # clients giving up on a fifth of requests: answers come too slowly
CUT_RATE_WARNING = 0.02  # streams broken mid-way: users see half answers
SLOW_PEER_RATIO = 0.5  # a node at half its peers' decode speed on the same model
MIN_SAMPLES = 5  # timed replies needed before comparing speeds
KEEP_LOADED_LOADS = 2  # cold loads of a model on a node before suggesting a longer keep_alive
BETTER_NODE_RATIO = 1.3  # another node this much faster at a model (and with room) is worth it
SEVERITY_COST = {"critical": 25, "warning": 10, "info": 2}
# rates of the traffic worth a finding: (id, count, threshold, severity, title, evidence, fix)
RATE_FINDINGS = (
    ("retry_rate", "retried", RETRY_RATE_WARNING, "warning", "Nodes fail requests before answering",
     "requests needed another node", "See /fleet/status for the failing node's last failure and check its Ollama log."),
    ("cancel_rate", "cancelled", CANCEL_RATE_INFO, "info", "Clients give up on requests",
     "were cancelled by their client", "Answers may be too slow: add a node or use smaller models for interactive apps."),
    ("cut_streams", "incomplete", CUT_RATE_WARNING, "warning", "Streams break mid-answer", "streams ended early",
     "Check the nodes' stability (a node that restarts or runs out of memory mid-answer)."),
)


def read_number(text, field_name):
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise BadInput(field_name, "a number", text) from None
    if not math.isfinite(value):
        raise BadInput(field_name, "a finite number", text)
    return value


def read_range(args):
    """{since, until, hours} from ?since=<unix s> or ?hours=N (default 24)."""
    now = time.time()
    if args.get("since") not in (None, ""):
        since = read_real(read_number(args["since"], "since"), "since", 0, now)
    else:
        hours = read_real(read_number(args.get("hours") or 24, "hours"), "hours", 0.01, 24 * 3660)
        since = now - hours * 3600
    return {"since": since, "until": now, "hours": round((now - since) / 3600, 3)}


def trace_summary(row):
    apps = json.loads(row["apps"]) if row["apps"] else []
    return {"request_id": row["request_id"], "timestamp": row["timestamp"], "model": row["model"] or None,
            "original_model": row["original_model"] or None, "node_id": row["node_id"], "status": row["status"],
            "latency_ms": row["latency_ms"], "time_to_first_token_ms": row["time_to_first_token_ms"],
            "queue_ms": row["queue_ms"], "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"], "api": row["api"], "endpoint": row["endpoint"],
            "stream": bool(row["stream"]), "retry_count": row["retry_count"] or 0,
            "fallback_used": bool(row["fallback_used"]), "app": apps[0] if apps else None, "apps": apps,
            "tags": json.loads(row["tags"]) if row["tags"] else [], "client_ip": row["client_ip"],
            "error_message": row["error_message"]}


def recent_traces(analytics, args):
    """The request log: newest first, filtered by model, node, app and status."""
    span = read_range(args)
    limit = int(read_whole(read_number(args.get("limit") or TRACE_LIMIT_DEFAULT, "limit"), "limit", 1, 10 ** 9))
    clauses, params = ["timestamp >= ?", ANALYZED], [span["since"]]
    for field_name in ("model", "node_id", "status"):
        if args.get(field_name):
            clauses.append(f"{field_name} = ?")
            params.append(read_text(args[field_name], field_name))
    if args.get("app"):
        clauses.append("EXISTS (SELECT 1 FROM json_each(request_traces.apps) WHERE value = ?)")
        params.append(read_text(args["app"], "app"))
    rows = analytics.rows(f"SELECT * FROM request_traces WHERE {' AND '.join(clauses)} "
                          f"ORDER BY timestamp DESC LIMIT ?", (*params, min(limit, TRACE_LIMIT_MAX)))
    return {"range": span, "traces": [trace_summary(row) for row in rows]}


def trace_detail(analytics, request_id):
    """One request in full, with every routing decision herd made for it."""
    rows = analytics.rows("SELECT * FROM request_traces WHERE request_id = ?", (request_id,))
    if not rows:
        raise HerdError(404, f"no trace {ascii(request_id)[1:-1]}; it may be older than the retention", "not_found")
    row = rows[0]
    decisions = [decision_view(record) for record in json.loads(row["decisions"])] if row["decisions"] else []
    completion, eval_ms = row["completion_tokens"], row["eval_ms"]
    return {"trace": {**trace_summary(row), "user_agent": row["user_agent"],
                      "decode_tps": round(completion / eval_ms * 1000, 1) if completion and eval_ms else None,
                      "prompt_tps": round(row["prompt_tokens"] / row["prompt_eval_ms"] * 1000, 1)
                      if row["prompt_tokens"] and row["prompt_eval_ms"] else None,
                      "load_ms": row["load_ms"], "cold_load": bool(row["cold_load"]),
                      "score": row["score"], "events": json.loads(row["events"]) if row["events"] else [],
                      "decision": decisions[-1] if decisions else None, "attempts": decisions}}


def model_figures(analytics, args):
    span = read_range(args)
    by_node = analytics.tallies(span["since"], span["until"],
                                grouped(lambda t, model, node, app, api: (model, node) if model else None))
    by_model = collections.defaultdict(Tally)
    for (model, _), tally in by_node.items():
        by_model[model].add_tally(tally)
    models = []
    for model, tally in sorted(by_model.items(), key=lambda item: -item[1].counts["requests"]):
        nodes = [{"node_id": node, **by_node[(m, node)].view()} for (m, node) in sorted(by_node) if m == model and node]
        models.append({"model": model, **tally.view(), "nodes": nodes})
    return {"range": span, "models": models}


def usage_figures(analytics, args):
    span = read_range(args)
    width = span["until"] - span["since"]
    bucket = next(size for limit, size in USAGE_BUCKETS if width <= limit)
    tallies = analytics.tallies(span["since"], span["until"],
                                grouped(lambda t, model, node, app, api: int(t // bucket * bucket)), resolution=bucket)
    total = Tally()
    buckets = []
    start = int(span["since"] // bucket * bucket)
    while start < span["until"]:
        tally = tallies.get(start) or Tally()
        total.add_tally(tally)
        view = tally.view()
        buckets.append({"start": start, **{key: view[key] for key in (
            "requests", "errors", "tokens_in", "tokens_out", "latency_p50_ms", "latency_p95_ms",
            "ttft_p50_ms", "ttft_p95_ms")}})
        start += bucket
    view = total.view()
    return {"range": span, "bucket_s": bucket, "buckets": buckets if total.counts["requests"] else [],
            "totals": {key: view[key] for key in ("requests", "errors", "tokens_in", "tokens_out")}}


def app_figures(analytics, args):
    span = read_range(args)
    by_model = analytics.tallies(span["since"], span["until"],
                                 grouped(lambda t, model, node, app, api: (app, model), apps=True))
    by_app = collections.defaultdict(Tally)
    for (app, _), tally in by_model.items():
        by_app[app].add_tally(tally)
    total = analytics.tallies(span["since"], span["until"], grouped(lambda *_: "all")).get("all", Tally())
    apps = [{"app": app, "kind": "client" if " from " in app else "tag",
             **{key: value for key, value in tally.view().items() if key in (
                 "requests", "errors", "tokens_in", "tokens_out", "latency_p50_ms", "latency_p95_ms")},
             "models": sorted(m for (a, m) in by_model if a == app and m)}
            for app, tally in sorted(by_app.items(), key=lambda item: -item[1].counts["requests"])]
    totals = total.view()
    return {"range": span, "apps": apps,
            "totals": {key: totals[key] for key in ("requests", "errors", "tokens_in", "tokens_out")}}


def speed_figures(analytics, span):
    """Per node x model, from traffic: decode and prompt tokens/s, TTFT, load time, samples."""
    by_node = analytics.tallies(span["since"], span["until"],
                                grouped(lambda t, model, node, app, api: (node, model) if model and node else None))
    return [{"node_id": node, "model": model, "samples": tally.counts["requests"],
             **{key: value for key, value in tally.view().items()
                if key in ("decode_tps", "prompt_tps", "ttft_p50_ms", "ttft_p95_ms", "load_s")}}
            for (node, model), tally in sorted(by_node.items())]


def health_report(herd, args):
    """A score, vital signs and findings a home-lab user can act on."""
    span = read_range(args)
    analytics, now = herd.analytics, time.time()
    groups = analytics.tallies(span["since"], span["until"], grouped(lambda t, model, node, app, api: (node, model)))
    total = Tally()
    for tally in groups.values():
        total.add_tally(tally)
    by_node = {(node, model): tally for (node, model), tally in groups.items() if node and model}
    nodes = herd.fleet.health_view()
    findings = []

    def find(id_, severity, node_id, title, evidence, fix):
        findings.append({"id": id_, "severity": severity, "node_id": node_id, "title": title,
                         "evidence": evidence, "fix": fix})

    for node in nodes:
        name = node["node_id"]
        if node["status"] == "offline":
            find("node_offline", "critical", name, f"{name} is offline",
                 f"no report for {now - node['last_seen']:.0f} s (it reports every {node['interval_s']:g} s)",
                 f"Start herd-node on {name} (or check its network and Ollama).")
        elif not node["reachable"]:
            find("ollama_unreachable", "critical", name, f"Ollama on {name} does not answer",
                 node["ollama_error"] or "no answer", f"Start Ollama on {name} (`ollama serve`).")
        if node["returns_last_hour"] >= FLAPPING_RETURNS:
            find("node_flapping", "warning", name, f"{name} keeps dropping out",
                 f"came back online {node['returns_last_hour']} times in the last hour",
                 f"Check {name}'s network, power saving and sleep settings.")
        memory = node["memory"] or {}
        if memory.get("total_gb") and memory.get("available_gb") is not None \
                and memory["available_gb"] < MEMORY_PRESSURE * memory["total_gb"]:
            find("memory_pressure", "warning", name, f"{name} is short of memory",
                 f"{memory['available_gb']:.1f} of {memory['total_gb']:.1f} GB available",
                 f"Unload models or close other programs on {name}, or give herd-node a smaller --memory-gb.")
        if node["source"] != "agent":
            find("agentless_node", "info", name, f"herd polls {name} without an agent",
                 "no memory, GPU or parallel-slot figures for it; herd assumes one request at a time",
                 f"Run herd-node on {name}.")
        if node["loopback_only"]:
            find("ollama_loopback_only", "critical", name, f"Ollama on {name} listens on 127.0.0.1 only",
                 f"its agent reaches it, herd's requests to {node['ollama_url']} are refused",
                 f"Set OLLAMA_HOST=0.0.0.0 on {name} and restart Ollama.")
    versions = sorted({n["ollama_version"] for n in nodes if n["ollama_version"] and n["status"] != "offline"})
    if len(versions) > 1:
        find("ollama_versions_differ", "info", None, "Nodes run different Ollama versions",
             ", ".join(f"{n['node_id']} {n['ollama_version']}" for n in nodes if n["ollama_version"]),
             "Update Ollama on every node to the same version.")
    for (node, model), tally in by_node.items():
        loads = tally.counts["cold_loads"]
        if loads >= THRASHING_LOADS:
            find("model_thrashing", "warning", node, f"{model} keeps reloading on {node}",
                 f"loaded {loads} times for {tally.counts['requests']} requests in the last {span['hours']:g} h",
                 "Raise OLLAMA_MAX_LOADED_MODELS on that node or send a longer keep_alive, so models stay loaded.")
        if tally.counts["reloads"] >= CONTEXT_RELOADS:
            find("context_reloads", "warning", node, f"{model} on {node} reloads for a larger context",
                 f"{tally.counts['reloads']} requests asked for more num_ctx than it ran with",
                 "Have clients send the same num_ctx, or set OLLAMA_CONTEXT_LENGTH on the node to the largest they use.")
    speeds = collections.defaultdict(dict)
    for (node, model), tally in by_node.items():
        view = tally.view()
        if view["decode_tps"] and tally.counts["eval_tokens"] and tally.counts["requests"] >= MIN_SAMPLES:
            speeds[model][node] = view["decode_tps"]
    for model, per_node in speeds.items():
        best = max(per_node.values())
        for node, speed in per_node.items():
            if len(per_node) > 1 and speed < SLOW_PEER_RATIO * best:
                find("slow_node", "info", node, f"{node} is slow at {model}",
                     f"{speed:g} tokens/s against {best:g} on the fastest peer",
                     f"Check {node} runs {model} on its GPU (size_vram in /api/ps); herd already sends it less.")
    requests_n = total.counts["requests"]
    if requests_n >= MIN_REQUESTS_FOR_RATES:
        rates = {key: total.counts[key] / requests_n for key in ("errors", "retried", "cancelled", "incomplete", "reaped")}
        if rates["errors"] - rates["cancelled"] >= ERROR_RATE_WARNING:
            severity = "critical" if rates["errors"] - rates["cancelled"] >= ERROR_RATE_CRITICAL else "warning"
            find("error_rate", severity, None, "Requests are failing",
                 f"{total.counts['failed'] + total.counts['incomplete'] + total.counts['reaped']} of {requests_n} failed",
                 "Open the request log filtered to status failed to see which nodes and models.")
        for id_, key, threshold, severity, title, evidence, fix in RATE_FINDINGS:
            if rates[key] >= threshold:
                find(id_, severity, None, title, f"{total.counts[key]} of {requests_n} {evidence}", fix)
        if total.counts["reaped"]:
            find("reaped", "warning", None, "Requests hung and were reaped",
                 f"{total.counts['reaped']} produced no byte for the stall timeout",
                 "Check the node's Ollama for stuck runners; lower --stall-timeout to free slots sooner.")
    findings.sort(key=lambda f: ("critical", "warning", "info").index(f["severity"]))
    online = sum(1 for n in nodes if n["status"] == "online")
    view = total.view()
    return {"range": span, "score": max(0, 100 - sum(SEVERITY_COST[f["severity"]] for f in findings)),
            "vitals": {"nodes_online": online, "nodes_total": len(nodes), "requests": requests_n,
                       "error_rate": round(total.counts["errors"] / requests_n, 4) if requests_n else None,
                       "retry_rate": round(total.counts["retried"] / requests_n, 4) if requests_n else None,
                       "cold_loads": view["cold_loads"], "context_reloads": view["reloads"],
                       "latency_p95_ms": view["latency_p95_ms"], "ttft_p95_ms": view["ttft_p95_ms"]},
            "findings": findings}


def recommendations(herd, args):
    """Changes that would make the fleet faster, each with its reason and the numbers behind it."""
    span = read_range(args)
    analytics = herd.analytics
    by_node = analytics.tallies(span["since"], span["until"],
                                grouped(lambda t, model, node, app, api: (node, model) if model and node else None))
    inventory = herd.fleet.inventory()
    out = []
    for (node, model), tally in sorted(by_node.items()):
        loads, requests_n = tally.counts["cold_loads"], tally.counts["requests"]
        if loads >= KEEP_LOADED_LOADS and requests_n >= 2 * loads:
            gap = analytics.longest_gap_before_load(node, model, span)
            keep = f"{math.ceil(gap / 60)}m" if gap else "30m"
            load_s = tally.view()["load_s"]
            out.append({"kind": "keep_alive", "node_id": node, "model": model,
                        "reason": f"{model} was loaded {loads} times on {node} for {requests_n} requests; "
                                  f"keep_alive {keep} (or OLLAMA_KEEP_ALIVE={keep} on {node}) would have kept it loaded",
                        "evidence": {"cold_loads": loads, "requests": requests_n, "load_s": load_s,
                                     "longest_idle_gap_s": round(gap, 1) if gap else None}})
    used = {(node, model) for (node, model) in by_node}
    for node_id, models in inventory.items():
        for name, size_gb in models.items():
            if (node_id, name) not in used:
                out.append({"kind": "unused_on_disk", "node_id": node_id, "model": name,
                            "reason": f"{name} on {node_id} served no request in the last {span['hours']:g} h; "
                                      f"`ollama rm {name}` there frees {size_gb:g} GB",
                            "evidence": {"requests": 0, "size_gb": size_gb}})
    speeds = collections.defaultdict(dict)
    for (node, model), tally in by_node.items():
        view = tally.view()
        if view["decode_tps"] and tally.counts["requests"] >= MIN_SAMPLES:
            speeds[model][node] = (view["decode_tps"], tally.counts["requests"])
    room = herd.fleet.room_for()
    for model, per_node in speeds.items():
        busiest = max(per_node, key=lambda n: per_node[n][1])
        speed = per_node[busiest][0]
        for node, (other_speed, _) in per_node.items():
            if node != busiest and other_speed >= BETTER_NODE_RATIO * speed and room.get((node, model)):
                out.append({"kind": "better_node", "node_id": node, "model": model,
                            "reason": f"{model} runs {other_speed / speed:.1f}x faster on {node} than on {busiest}, "
                                      f"which serves most of its requests, and {node} has room for it",
                            "evidence": {"decode_tps": {node: other_speed, busiest: speed},
                                         "requests": {n: r for n, (_, r) in per_node.items()}}})
    return {"range": span, "recommendations": out}


def model_management(herd, args):
    span = read_range(args)
    by_node = herd.analytics.tallies(span["since"], span["until"],
                                     grouped(lambda t, model, node, app, api: (node, model) if model and node else None))
    nodes = herd.fleet.management()
    last_used = herd.analytics.last_used([(node["node_id"], model["name"]) for node in nodes for model in node["models"]])
    for node in nodes:
        node["disk_used_gb"] = round(sum(m["size_gb"] for m in node["models"]), 2)
        for model in node["models"]:
            tally = by_node.get((node["node_id"], model["name"]))
            model["requests"] = tally.counts["requests"] if tally else 0
            model["last_used"] = last_used[(node["node_id"], model["name"])]
    return {"range": span, "nodes": nodes, "pulls": herd.pulls.snapshot()}


# -- /metrics: Prometheus text, counters fed by the trace writer -----------------------------

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
COUNTERS = {"herd_requests_total": "Client requests by node, model, API and outcome.",
            "herd_tokens_in_total": "Prompt tokens the nodes reported.",
            "herd_tokens_out_total": "Completion tokens the nodes reported.",
            "herd_cold_loads_total": "Requests that loaded their model (or reloaded it for a larger context).",
            "herd_retries_total": "Attempts retried on another node before the first byte.",
            "herd_fallbacks_total": "Requests served by a fallback model."}
HISTOGRAMS = {"herd_request_duration_seconds": "Time from the request to the end of its answer.",
              "herd_time_to_first_token_seconds": "Time from the request to its first byte (streams)."}


def label_text(labels):
    escaped = (f'{key}="{str(value).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), chr(92) + "n")}"'
               for key, value in labels)
    return "{" + ",".join(escaped) + "}" if labels else ""


class Metrics:
    """Prometheus counters and histograms since herd started. The trace writer feeds them from
    each row it writes, so the request path pays nothing; gauges are read from the fleet when
    scraped. Labels come only from node, model, API and status (no request ids, no tags)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = collections.defaultdict(float)  # (name, labels) -> value
        self.histograms = {}  # (name, labels) -> [count per bucket..., sum, count]

    def observe(self, rows):
        with self.lock:
            for row in rows:
                if row["internal"] or not row["api"]:
                    continue
                pair = (("node", row["node_id"] or ""), ("model", row["model"] or ""))
                with_api = pair + (("api", row["api"]),)
                counters = self.counters
                counters[("herd_requests_total", with_api + (("status", row["status"]),))] += 1
                counters[("herd_tokens_in_total", pair)] += row["prompt_tokens"] or 0
                counters[("herd_tokens_out_total", pair)] += row["completion_tokens"] or 0
                counters[("herd_cold_loads_total", pair)] += row["cold_load"] or 0
                counters[("herd_retries_total", pair)] += row["retry_count"] or 0
                counters[("herd_fallbacks_total", pair)] += row["fallback_used"] or 0
                if row["latency_ms"] is not None:
                    self._observe("herd_request_duration_seconds", with_api, row["latency_ms"] / 1000)
                if row["time_to_first_token_ms"] is not None:
                    self._observe("herd_time_to_first_token_seconds", with_api, row["time_to_first_token_ms"] / 1000)

    def _observe(self, name, labels, seconds):
        counts = self.histograms.get((name, labels))
        if counts is None:
            counts = self.histograms[(name, labels)] = [0] * (len(DURATION_BUCKETS) + 3)
        counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1  # the first bucket it fits, or +Inf
        counts[-2] += seconds
        counts[-1] += 1

    def render(self, gauges):
        """The text exposition format 0.0.4; `gauges`: {(name, help): {labels: value}}."""
        lines = []
        with self.lock:
            for name, help_text in COUNTERS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
                lines += [f"{name}{label_text(labels)} {value:g}" for (metric, labels), value in
                          sorted(self.counters.items()) if metric == name]
            for name, help_text in HISTOGRAMS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                for (metric, labels), counts in sorted(self.histograms.items()):
                    if metric != name:
                        continue
                    for bound, count in zip(DURATION_BUCKETS, itertools.accumulate(counts)):
                        lines.append(f"{name}_bucket{label_text(labels + (('le', f'{bound:g}'),))} {count}")
                    lines.append(f"{name}_bucket{label_text(labels + (('le', '+Inf'),))} {counts[-1]}")
                    lines.append(f"{name}_sum{label_text(labels)} {counts[-2]:g}")
                    lines.append(f"{name}_count{label_text(labels)} {counts[-1]}")
        for (name, help_text), values in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines += [f"{name}{label_text(labels)} {value:g}" for labels, value in sorted(values.items())]
        return "\n".join(lines) + "\n"


# -- benchmarks: one fixed, repeatable run per node x model, through the normal admission ------

BENCH_PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. "
                "Describe the sea, the weather and the keeper's daily routine in plain words. ") * 4
BENCH_PREDICT = 128  # output tokens per stream: long enough for a steady decode speed


class Benchmarks:
    """Runs the fixed benchmark (1 stream, then the node's parallel slots' worth at once) and
    stores each result in latency.db (benchmark_runs), so runs of a node x model compare."""

    def __init__(self, herd):
        self.herd = herd
        self.lock = threading.Lock()
        self.running = None

    def run(self, node_id, model, load):
        herd = self.herd
        with self.lock:
            if self.running is not None:
                raise HerdError(409, f"a benchmark is already running ({self.running['model']} on "
                                f"{self.running['node_id']}); wait for it", "benchmark_running")
            self.running = {"node_id": node_id, "model": model, "started": time.time()}
        try:
            state = herd.fleet.model_state(node_id, model)
            if state == "unknown node":
                raise HerdError(404, f"no node named {ascii(node_id)[1:-1]}; see /fleet/status", "unknown_node")
            if state == "not installed":
                raise HerdError(404, f"{model} is not installed on {node_id}; pull it there first", "model_not_found")
            if state == "not loaded" and not load:
                raise HerdError(409, f"{model} is not loaded on {node_id}: a benchmark would time a load and may "
                                "evict other models; send {\"load\": true} to load it first", "not_loaded")
            started = time.time()
            if state == "not loaded":
                self._streams(node_id, model, 1, predict=1)  # the load, not timed
            single = self._streams(node_id, model, 1)
            parallel = self._streams(node_id, model, herd.fleet.slots_of(node_id))
            result = {"node_id": node_id, "model": model, "started": started,
                      "duration_s": round(time.time() - started, 2), "num_predict": BENCH_PREDICT,
                      "num_parallel": parallel["streams"], "single": single, "parallel": parallel,
                      "error": single.get("error") or parallel.get("error")}
            result["run_id"] = herd.traces.save_benchmark(result)
            return result
        finally:
            with self.lock:
                self.running = None

    def _streams(self, node_id, model, count, predict=BENCH_PREDICT):
        """Run `count` identical streams at once on the node; their speeds and times."""
        results = [None] * count

        def one(index):
            body = {"model": model, "prompt": BENCH_PROMPT, "stream": True, "options": {"num_predict": predict}}
            call = Call(api="ollama", endpoint="/api/generate", body=body, raw=json.dumps(body).encode(),
                        model=model, stream=True, fallback_models=[], tags=[BENCHMARK_TAG], client_ip="herd",
                        request_id=self.herd.request_id(), started=time.perf_counter(),
                        prompt_chars=len(BENCH_PROMPT), only_node=node_id, user_agent="herd benchmark",
                        client_options=dict(body["options"]))
            response = self.herd.proxy.serve(call)
            first, tail = None, b""
            for chunk in response.response:
                first = first or time.perf_counter()
                tail = (tail + chunk)[-TAIL_BYTES:]
            response.close()
            ended = time.perf_counter()
            stats = read_reply(tail)
            timings = stats.timings or {}
            results[index] = {
                "ok": response.status_code == 200 and b'"done":true' in tail.replace(b" ", b""),
                "error": None if response.status_code == 200 else upstream_message(response.get_data()),
                "ttft_ms": (first - call.started) * 1000 if first else None,
                "latency_ms": (ended - call.started) * 1000, "tokens": stats.completion_tokens or 0,
                "decode_tps": timings["eval_count"] / timings["eval_s"] if timings.get("eval_s") and timings.get("eval_count") else None,
                "prompt_tps": timings["prompt_count"] / timings["prompt_s"] if timings.get("prompt_s") and timings.get("prompt_count") else None}

        threads = [threading.Thread(target=one, args=(i,), name="herd-benchmark") for i in range(count)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        good = [r for r in results if r and r["ok"]]
        if not good:
            return {"streams": count, "error": next((r["error"] for r in results if r and r["error"]), "no stream completed")}

        def mean(key):
            values = [r[key] for r in good if r[key] is not None]
            return round(statistics.fmean(values), 1) if values else None

        return {"streams": count, "completed": len(good), "decode_tps": mean("decode_tps"), "prompt_tps": mean("prompt_tps"),
                "aggregate_tps": round(sum(r["tokens"] for r in good) / wall, 1), "ttft_ms": mean("ttft_ms"),
                "latency_ms": round(max(r["latency_ms"] for r in good), 1), "error": None}


# =============================================================================================
# Herd: one router, the parts above wired together and their background threads
# =============================================================================================

DRAIN_GRACE_S = 5.0  # after the drain timeout, how long requests cut short get to write their last chunk


MAX_PATH_CHARS = 256  # of a path a trace row keeps (a client may ask for any length)


class Herd:
    """One router: configuration, fleet, poller, proxy, watchdog, trace store. Built by create_app."""

    def __init__(self, config):
        self.config = config
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        self.traces = TraceStore(Path(config.data_dir) / "latency.db", config.retention_days)
        self.settings = self.traces.load_settings()
        if config.context_protection is not None:
            self.settings["context_protection"] = config.context_protection  # an explicit flag wins
        config.context_protection = self.settings["context_protection"]
        self.fleet = Fleet(config)
        self.pulls = Pulls()
        self.capabilities = Capabilities(self.fleet)
        self.proxy = Proxy(self.fleet, self.traces, config, self.settings, self.pulls, self.capabilities)
        self.analytics = Analytics(self.traces)
        self.metrics = Metrics()
        self.traces.listeners.append(self.metrics.observe)
        self.benchmarks = Benchmarks(self)
        self.watchdog = Watchdog(self.proxy, self.fleet)
        self.warmer = Warmer(self.fleet, self.settings, self.capabilities)
        self.poller = NodePoller(self.fleet, config)
        self.advertiser = None
        self.draining = threading.Event()  # shutting down: new requests get 503
        self.refused_beats = set()  # (address, reason) of heartbeats refused, logged once each
        self._ids = itertools.count(1)
        self._boot = f"{int(time.time()) & 0xFFFFFF:06x}"

    def start(self):
        self.poller.start()
        self.watchdog.thread.start()
        self.warmer.thread.start()

    def advertise(self, port):
        """Announce this router on mDNS (unless --no-mdns) once its port is known."""
        if self.config.mdns and self.advertiser is None:
            self.advertiser = Advertiser(self.config.host, port)

    def change_settings(self, changes):
        """Validate, apply and persist a partial settings update; raises HerdError(400)."""
        if not isinstance(changes, dict) or not changes:
            raise BadInput("", 'a JSON object of settings to change, e.g. {"auto_pull": false}', changes,
                           code="invalid_settings")
        for key, value in changes.items():
            if key not in RUNTIME_SETTINGS:
                raise HerdError(400, f"unknown setting {ascii(key)[:80]}; settings are {', '.join(RUNTIME_SETTINGS)}",
                                "invalid_settings")
            if key == "context_protection" and value not in CONTEXT_POLICIES:
                raise BadInput(key, f"one of {', '.join(CONTEXT_POLICIES)}", value, code="invalid_settings")
            if key != "context_protection":
                read_flag(value, key)
        self.settings.update(changes)
        self.fleet.set_context_policy(self.settings["context_protection"])
        self.traces.save_settings(changes)
        log.info("settings changed: %s", changes)

    def shutdown(self):
        self.poller.stop.set()
        self.watchdog.stop.set()
        self.warmer.stop.set()
        if self.advertiser is not None:
            self.advertiser.close()
        self.traces.close()

    def request_id(self):
        # A counter, not uuid4: cheaper on the hot path and still unique across restarts.
        return f"{self._boot}-{next(self._ids)}"

    def delete_model(self, node_id, model):
        """Delete a model from one node (the dashboard's delete): Ollama's answer, in herd's words."""
        url = self.fleet.url_of(node_id)
        if url is None:
            raise HerdError(404, f"no node named {ascii(node_id)[1:-1]}; see GET /fleet/status", "unknown_node")
        try:
            answer = control_session().delete(url + "/api/delete", json={"model": model}, timeout=30)
        except requests.RequestException as exc:
            raise HerdError(502, f"{node_id} did not answer the delete ({type(exc).__name__})", "upstream_failed") from None
        if answer.status_code != 200:
            raise HerdError(answer.status_code if answer.status_code < 500 else 502,
                            f"{node_id} refused to delete {model}: {upstream_message(answer.content)}", "delete_failed")
        self.fleet.forget_model(node_id, model)
        log.info("deleted %s from %s (dashboard)", model, node_id)
        return {"deleted": True, "model": model, "node_id": node_id}

    def trace_answer(self, api, endpoint, client_ip, status, message, request_id=None, user_agent=""):
        """The trace row of an error answer that no exchange served (see HTTP routes)."""
        outcome = "cancelled" if status == 499 else "failed"
        endpoint = endpoint[:MAX_PATH_CHARS]  # a path of any length may be asked for: the row keeps its start
        self.proxy.refuse(api, endpoint, client_ip, request_id or self.request_id(),
                          message or f"answered {status}", outcome, user_agent)

    def heartbeat_refused(self, address, reason):
        if (address, reason) not in self.refused_beats and len(self.refused_beats) < 1000:
            self.refused_beats.add((address, reason))
            log.warning("refused a heartbeat from %s: %s", address, reason)

    def drain(self, timeout):
        """Shut down without losing a request: refuse new ones (503), let those running finish for
        up to `timeout` seconds, end the rest with an error in their API's shape (a stream's last
        chunk), and return once every one of them has its trace row."""
        self.draining.set()
        deadline = time.monotonic() + timeout
        log.info("draining: %d requests running, waiting up to %g s", len(self.proxy.running()), timeout)
        while self.proxy.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        leftover = self.proxy.running()
        if leftover:
            log.warning("ending %d requests still running after %g s", len(leftover), timeout)
            self.fleet.cancel_waiters()
            for exchange in leftover:
                exchange.abort("shutdown")
            deadline = time.monotonic() + DRAIN_GRACE_S
            while self.proxy.running() and time.monotonic() < deadline:
                time.sleep(0.05)


# =============================================================================================
# HTTP routes: each handler parses, chooses, forwards, records
# =============================================================================================
#
# Every client request gets exactly one trace row, whatever its answer: the proxy writes the rows
# of the requests it serves, and one hook writes the row of every other error answer (a refusal at
# the door, an unknown route, a wrong method, a missing key, a request during shutdown); Waitress's
# own errors are written by JsonErrorTask. Not client requests, and not traced: reads herd answers
# from memory when they succeed (/api/tags, /api/ps, /api/version, /v1/models, /fleet/status),
# agents' heartbeats, and the dashboard with its API.

PROXIED = {"/api/chat": "ollama", "/api/generate": "ollama", "/api/embed": "ollama",
           "/api/embeddings": "ollama", "/v1/chat/completions": "openai", "/v1/completions": "openai",
           "/v1/embeddings": "openai"}
NOT_IMPLEMENTED = ("/api/copy", "/api/create", "/api/push", "/api/blobs/<path:digest>")
UNTRACED_PREFIXES = ("/dashboard", "/static/", "/heartbeat", "/metrics")
# Open without the key: the greeting, and the dashboard's page and assets (no data; the page asks
# for the key and sends it with every API call)
OPEN_PATHS = ("/", "/dashboard", "/dashboard/")
TRACED = "herd.traced"  # set in a request's WSGI environ once its trace row is taken care of
REQUEST_ID = "herd.request_id"  # the id a request read at the door got, for its row if it is refused


def version_key(version):
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.\-+]", version))


def union_models(online, which):
    """Ollama's /api/tags or /api/ps shape, merged over nodes, each entry with a `nodes` list."""
    merged = {}
    for node_id, _url, models, loaded in online:
        for name, entry in (models if which == "models" else loaded).items():
            if name not in merged:
                merged[name] = dict(entry, name=name, model=name, nodes=[])
            merged[name]["nodes"].append(node_id)
    for entry in merged.values():
        entry["nodes"].sort()
    return [merged[name] for name in sorted(merged)]


def openai_model(entry):
    try:
        created = int(datetime.fromisoformat(entry["modified_at"].replace("Z", "+00:00")).timestamp())
    except (KeyError, TypeError, AttributeError, ValueError):
        created = 0
    return {"id": entry["name"], "object": "model", "created": created, "owned_by": "library",
            "nodes": entry.get("nodes", [])}


def bearer_token(header):
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case), or None."""
    scheme, _, token = (header or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def has_key(config):
    token = bearer_token(header_text(request.headers.get("Authorization")))  # (a key in UTF-8 too)
    return token is not None and hmac.compare_digest(token.encode("utf-8", "replace"),
                                                     config.api_key.encode("utf-8", "replace"))


def may_change_fleet(config):
    """Routes that change the fleet (pull, delete, settings, auto-pull): a client with the key, or
    a loopback client when no key is set."""
    return bool(config.api_key) or is_loopback(request.remote_addr)


def answer_message(response):
    """The error text of one of herd's JSON error answers."""
    try:
        error = json.loads(response.get_data()).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("message") if isinstance(error, dict) else error


def add_gates(app, herd):
    """What every request passes first: the API key, the drain at shutdown; and, last, the trace
    row of any error answer nobody else traced."""
    config = herd.config

    @app.before_request
    def check_key_and_drain():
        if config.api_key and request.path not in OPEN_PATHS and not request.path.startswith("/static/") \
                and not has_key(config):
            return error_response(api_of(request.path), 401, "missing or wrong API key; send "
                                  "'Authorization: Bearer <key>' as set by herd --api-key", "unauthorized")
        if herd.draining.is_set() and request.path != "/":
            return error_response(api_of(request.path), 503, "herd is shutting down; retry in a few "
                                  "seconds", "shutting_down", retry_after=5)
        return None

    @app.after_request
    def trace_other_answers(response):
        environ = request.environ
        if (environ.get(TRACED) or (response.status_code < 400 and environ["REQUEST_METHOD"] in ("GET", "HEAD", "OPTIONS"))
                or environ.get("HTTP_X_HERD_DASHBOARD") or request.path.startswith(UNTRACED_PREFIXES)):
            return response  # served and traced already, a read, or the dashboard's own
        herd.trace_answer(api_of(request.path), request.path, request.remote_addr, response.status_code,
                          answer_message(response), environ.get(REQUEST_ID),
                          read_user_agent(environ.get("HTTP_USER_AGENT")))
        return response


def add_proxied_routes(app, herd):
    """The Ollama and OpenAI inference routes: read at the door, then the proxy serves the call."""

    def proxied(path, api):
        def view():
            environ = request.environ
            headers = {"X-Herd-Tags": header_text(environ.get("HTTP_X_HERD_TAGS")),
                       "User-Agent": environ.get("HTTP_USER_AGENT")}
            environ[REQUEST_ID] = herd.request_id()  # the row's, should the call be refused at the door
            call = parse_call(api, path, request.get_data(cache=False), headers, environ.get("REMOTE_ADDR"),
                              environ[REQUEST_ID])
            call.client_gone = request.environ.get("waitress.client_disconnected", call.client_gone)
            request.environ[TRACED] = True  # the call's Exchange writes the row, however it ends
            return herd.proxy.serve(call, admit=(path != "/api/show"))
        view.__name__ = "proxy_" + path.strip("/").replace("/", "_")
        return view

    for path, api in PROXIED.items():
        app.add_url_rule(path, view_func=proxied(path, api), methods=["POST"])
    app.add_url_rule("/api/show", view_func=proxied("/api/show", "ollama"), methods=["POST"])


def add_model_management(app, herd):
    """Pull and delete through the Ollama API (a pull goes where herd would route the model; a
    delete needs the node named), and the Ollama routes herd does not serve."""
    config = herd.config

    def management_call(endpoint, method, verb):
        if not may_change_fleet(config):
            raise HerdError(403, f"{verb} changes the fleet: call from the router's own machine or start "
                            "herd with --api-key", "forbidden")
        raw = request.get_data(cache=False)
        body, model, stream = read_management(raw, verb)
        pin = request.headers.get("X-Herd-Node")
        return Call(api="ollama", endpoint=endpoint, body=body, raw=raw, model=model,
                    stream=endpoint == "/api/pull" and stream, fallback_models=[], tags=[],
                    client_ip=request.remote_addr, request_id=herd.request_id(), started=time.perf_counter(),
                    method=method, pin=read_text(pin, "X-Herd-Node", MAX_NODE_ID_CHARS) if pin else None,
                    may_change_fleet=True)

    @app.post("/api/pull")
    def pull():
        call = management_call("/api/pull", "POST", "pulling")
        herd.proxy.spell(call)  # `Llama3.2` updates the node that has llama3.2, not a roomier one
        call.pin = call.pin or herd.fleet.pull_target(call.model)
        if call.pin is None:
            raise HerdError(503, "no node is online to pull onto; start herd-node or pass --node",
                            "no_nodes", retry_after=5)
        request.environ[TRACED] = True
        return herd.proxy.serve(call, admit=False)

    @app.delete("/api/delete")
    def delete():
        call = management_call("/api/delete", "DELETE", "deleting")
        if not call.pin:
            raise HerdError(400, "say which node to delete from with the X-Herd-Node header; herd never "
                            "deletes a model fleet-wide", "node_required")
        request.environ[TRACED] = True
        return herd.proxy.serve(call, admit=False)

    def not_implemented(**_):
        return error_response("ollama", 501, f"herd does not support {request.path}: run it against "
                              "one node's Ollama directly (ollama on that machine)", "not_implemented")

    for path in NOT_IMPLEMENTED:
        app.add_url_rule(path, endpoint="not_implemented_" + path, view_func=not_implemented,
                         methods=["POST", "HEAD", "GET", "DELETE"])


def add_local_answers(app, herd):
    """Ollama and OpenAI reads herd answers itself, from what the fleet reports."""

    @app.get("/")
    def root():
        return Response("herd is running", mimetype="text/plain")

    @app.get("/api/version")
    def version():
        versions = [v for v in herd.fleet.ollama_versions() if v]
        return {"version": min(versions, key=version_key) if versions else "0.0.0", "herd": __version__}

    @app.get("/api/tags")
    def tags():
        return {"models": union_models(herd.fleet.online_nodes(), "models")}

    @app.get("/api/ps")
    def ps():
        return {"models": union_models(herd.fleet.online_nodes(), "loaded")}

    @app.get("/v1/models")
    def openai_models():
        return {"object": "list", "data": [openai_model(m) for m in
                                           union_models(herd.fleet.online_nodes(), "models")]}

    @app.get("/v1/models/<path:model>")
    def openai_model_one(model):
        wanted = normalize_model(model)
        for entry in union_models(herd.fleet.online_nodes(), "models"):
            if entry["name"] == wanted:
                return openai_model(entry)
        return error_response("openai", 404, f"model {ascii(model)[1:-1]} is not on any online node",
                              "model_not_found")


def add_fleet_api(app, herd):
    """The fleet's own routes: its status, and heartbeats from agents."""

    @app.get("/fleet/status")
    def fleet_status():
        return herd.fleet.status()

    @app.post("/heartbeat")
    def heartbeat():
        try:
            beat = parse_heartbeat(request.get_data(cache=False))
        except HerdError as exc:
            herd.heartbeat_refused(request.remote_addr, exc.message)
            raise
        herd.fleet.report(beat["node_id"], beat["ollama_url"], "agent", beat["interval_s"], beat)
        return {"ok": True, "node_id": beat["node_id"]}


def add_dashboard_api(app, herd):
    """The dashboard page, its JSON under /dashboard/api/, and /metrics."""
    config = herd.config
    static = Path(__file__).resolve().parent / "static"

    def fleet_change(verb):
        """The body of a request that changes the fleet, once the client may."""
        if not may_change_fleet(config):
            raise HerdError(403, f"{verb} needs the router's own machine or --api-key", "forbidden")
        body = parse_json(request.get_data(cache=False) or b"{}")
        if not isinstance(body, dict):
            raise BadInput("", "a JSON object", body, code="invalid_json")
        return body

    def model_and_node(body):
        return (normalize_model(read_text(body.get("model"), "model")),
                read_text(body.get("node_id"), "node_id", MAX_NODE_ID_CHARS))

    @app.get("/dashboard")
    @app.get("/dashboard/")
    def dashboard_page():
        return send_from_directory(static, "index.html", max_age=0)

    @app.route("/dashboard/api/settings", methods=["GET", "POST"])
    def settings():
        if request.method == "POST":
            herd.change_settings(fleet_change("changing settings"))
        return dict(herd.settings)

    @app.get("/dashboard/api/traces")
    def traces():
        return recent_traces(herd.analytics, request.args)

    @app.get("/dashboard/api/traces/<path:request_id>")
    def trace(request_id):
        return trace_detail(herd.analytics, request_id)

    @app.get("/dashboard/api/models")
    def models():
        return model_figures(herd.analytics, request.args)

    @app.get("/dashboard/api/usage")
    def usage():
        return usage_figures(herd.analytics, request.args)

    @app.get("/dashboard/api/apps")
    def apps():
        return app_figures(herd.analytics, request.args)

    @app.get("/dashboard/api/health")
    def health():
        return health_report(herd, request.args)

    @app.get("/dashboard/api/recommendations")
    def recommended():
        return recommendations(herd, request.args)

    @app.get("/dashboard/api/model-management")
    def management():
        return model_management(herd, request.args)

    @app.post("/dashboard/api/pull")
    def dashboard_pull():
        model, node_id = model_and_node(fleet_change("pulling"))
        url = herd.fleet.url_of(node_id)
        if url is None:
            raise HerdError(404, f"no node named {ascii(node_id)[1:-1]}; see GET /fleet/status", "unknown_node")
        refused = herd.pulls.start(model, node_id, url)
        if refused:
            return {"started": False, "error": f"{refused}; retry when it is done", "pulls": herd.pulls.snapshot()}, 409
        return {"started": True, "pulls": herd.pulls.snapshot()}, 202

    @app.post("/dashboard/api/delete")
    def dashboard_delete():
        model, node_id = model_and_node(fleet_change("deleting"))
        return herd.delete_model(node_id, model)

    @app.route("/dashboard/api/benchmarks", methods=["GET", "POST"])
    def benchmarks():
        if request.method == "POST":
            body = fleet_change("running a benchmark")
            model, node_id = model_and_node(body)
            load = read_flag(body.get("load"), "load", optional=True) or False
            return {"run": herd.benchmarks.run(node_id, model, load)}
        span = read_range(request.args)
        return {"range": span, "traffic": speed_figures(herd.analytics, span), "runs": herd.traces.benchmark_runs(),
                "running": herd.benchmarks.running}

    @app.get("/metrics")
    def metrics():
        return Response(herd.metrics.render(herd.fleet.gauges()), mimetype="text/plain; version=0.0.4")


def body_too_large_message(config):
    return (f"request body is larger than {config.max_body_mb:g} MB; send less, or start herd with a "
            "larger --max-body-mb (FLEET_MAX_BODY_MB)")


def add_error_pages(app, herd):
    """Flask's own errors (no route, wrong method, body too large, a bug) and herd's own refusals
    (HerdError raised by a handler) in the API's shape."""
    config = herd.config

    @app.errorhandler(HerdError)
    def refused(exc):
        api = "openai" if request.path.startswith("/v1/") else "ollama"
        return error_response(api, exc.status, exc.message, exc.code, exc.retry_after)

    @app.errorhandler(404)
    def no_route(_):
        return error_response(api_of(request.path), 404, f"herd has no route {request.method} "
                              f"{ascii(request.path)[1:-1]}; see the README for the API", "no_route")

    @app.errorhandler(405)
    def wrong_method(_):
        return error_response(api_of(request.path), 405, f"{ascii(request.path)[1:-1]} does not take "
                              f"{request.method}", "method_not_allowed")

    @app.errorhandler(413)
    def too_large(_):
        return error_response(api_of(request.path), 413, body_too_large_message(config), "body_too_large")

    @app.errorhandler(Exception)
    def internal(exc):
        if hasattr(exc, "code") and hasattr(exc, "get_response"):  # any other HTTP error from Flask
            return error_response(api_of(request.path), exc.code, exc.description, "http_error")
        log.exception("internal error on %s %s", request.method, ascii(request.path))
        return error_response(api_of(request.path), 500, f"herd hit an internal error "
                              f"({type(exc).__name__}); the log at {config.data_dir}/logs/herd.jsonl "
                              "has the details", "internal_error")


def create_app(config):
    """Build a router (Flask app) with its own fleet, threads and database."""
    herd = Herd(config)
    app = Flask(__name__, static_folder=str(Path(__file__).resolve().parent / "static"),
                static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_body_mb * MB)
    app.herd = herd
    add_gates(app, herd)
    add_proxied_routes(app, herd)
    add_model_management(app, herd)
    add_local_answers(app, herd)
    add_fleet_api(app, herd)
    add_dashboard_api(app, herd)
    add_error_pages(app, herd)
    herd.start()
    return app


# =============================================================================================
# Server: Waitress sized for hundreds of concurrent streams
# =============================================================================================

def raise_fd_limit():
    """Each stream holds two sockets: lift the soft descriptor limit where the OS allows it."""
    try:
        import resource
    except ImportError:  # Windows has no such limit to lift
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit from %d; large stream counts may fail", soft)


class JsonErrorTask(waitress.task.ErrorTask):
    """Waitress's own error answers (a body over the limit, a request it cannot parse, a crash
    before the first byte) in the route's API shape instead of a text page, and traced."""

    def execute(self):
        error = self.request.error
        path = getattr(self.request, "path", None) or request_line_path(self.request)
        herd = getattr(self.channel.server, "herd", None)
        if error.code == 413 and herd is not None:
            message = body_too_large_message(herd.config)
        elif error.code >= 500:
            message = "herd hit an internal error; its log has the details"
        else:
            message = f"herd could not read the HTTP request ({error.reason}: {str(error.body)[:200]})"
        api = api_of(path)
        body = json.dumps(error_body(api, error.code, message, "http_error")).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
        if herd is not None and not path.startswith(UNTRACED_PREFIXES):
            herd.trace_answer(api, path, self.channel.addr[0] if self.channel.addr else "", error.code, message)


def request_line_path(parsed):
    """The path of a request Waitress could not finish parsing (a bad header), from its first
    line, so that its error answer takes the route's API shape."""
    parts = (getattr(parsed, "first_line", None) or b"").split()
    return parts[1].decode("latin-1").split("?")[0] if len(parts) >= 2 else ""


class HerdChannel(waitress.channel.HTTPChannel):
    """Waitress's channel, with herd's error answers, and a trace row for each request Waitress
    drops without running it: one whose client closed its side of the connection before a thread
    took it up (a half-close, a client gone at once), and those pipelined behind a reply that
    closes the connection (a stream)."""

    error_task_class = JsonErrorTask

    def service(self):
        queued, connected = self.requests, self.connected
        served = queued[0] if queued and connected else None
        super().service()
        if self.requests is queued:
            return  # the connection goes on: the next request is served in turn
        herd = getattr(self.server, "herd", None)
        for dropped in list(queued):  # closing, Waitress replaced the list and dropped these
            if dropped is not served and herd is not None:
                trace_dropped(herd, dropped, self.addr)


def trace_dropped(herd, parsed, addr):
    """The row of a request Waitress dropped unanswered (see HerdChannel), as for any answer:
    reads and herd's own pages are not traced."""
    path = getattr(parsed, "path", None) or request_line_path(parsed)
    if getattr(parsed, "command", None) in ("GET", "HEAD", "OPTIONS") or path.startswith(UNTRACED_PREFIXES):
        return
    herd.trace_answer(api_of(path), path, addr[0] if addr else "", 499,
                      "the client closed the connection before herd could answer (it closed its side, or "
                      "sent this request behind a streamed one)",
                      user_agent=read_user_agent((getattr(parsed, "headers", None) or {}).get("USER_AGENT")))


def make_server(app, config):
    """A Waitress server for `app` on config.host:port (port 0 picks a free one)."""
    raise_fd_limit()
    server = waitress.create_server(
        app, host=config.host, port=config.port, threads=config.threads,
        # Past connection_limit Waitress stops accepting and clients sit unseen in the backlog.
        connection_limit=config.threads * 2 + 100,
        # select() dies once a descriptor passes 1024; each proxied stream holds two.
        asyncore_use_poll=True,
        # Lets Waitress notice a client that left while its request is still running.
        channel_request_lookahead=1,
        max_request_body_size=int(config.max_body_mb * MB),
        ident="herd", expose_tracebacks=False, clear_untrusted_proxy_headers=True)
    server.channel_class = HerdChannel
    server.herd = app.herd  # for JsonErrorTask: the application Waitress holds is wrapped
    return server


def stop_server(server):
    """Stop a server made by make_server from another thread (tests)."""
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
    waitress.wasyncore.close_all(server._map)


# =============================================================================================
# Command line
# =============================================================================================

def parse_node(spec):
    """`name=URL` or `URL` -> (name, url). Unnamed nodes are called by their host (and port)."""
    spec = spec.strip()
    name, sep, url = spec.partition("=")
    if not sep or "://" in name:
        name, url = "", spec
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{spec!r} is not a node URL like http://gpu-box:11434 or "
                                 "gpu=http://gpu-box:11434", param_hint="--node")
    if not name:
        name = parts.hostname if (parts.port or 11434) == 11434 else f"{parts.hostname}:{parts.port}"
    return name, url.rstrip("/")


def stop_on_signals(herd):
    """SIGTERM and SIGINT (Ctrl-C) drain the router (Herd.drain) in a thread, then stop the server
    from the main thread; a second signal stops it at once. Exit status 0 either way."""
    stopping = threading.Event()

    def drain_then_stop():
        herd.drain(herd.config.drain_timeout)
        _thread.interrupt_main()  # comes back as a signal: the second one

    def on_signal(signum, _frame):
        if stopping.is_set():
            raise SystemExit(0)
        stopping.set()
        log.info("stopping: new requests get 503 while the %d running finish (up to %g s)",
                 len(herd.proxy.running()), herd.config.drain_timeout)
        threading.Thread(target=drain_then_stop, name="herd-drain", daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, on_signal)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default=Config.host, show_default=True, envvar="FLEET_HOST", help="Address to listen on.")
@click.option("--port", default=Config.port, show_default=True, type=click.IntRange(0, 65535),
              envvar="FLEET_PORT", help="Port to listen on.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Config.data_dir,
              show_default=True, envvar="FLEET_DATA_DIR", help="Where latency.db and logs/ live.")
@click.option("--node", "node_specs", multiple=True, metavar="[NAME=]URL",
              help="An Ollama to route to without an agent (repeatable; FLEET_NODES, comma separated).")
@click.option("--threads", default=Config.threads, show_default=True, type=click.IntRange(8, 10000),
              envvar="FLEET_THREADS", help="Worker threads: one per concurrent request or stream.")
@click.option("--api-key", envvar="FLEET_API_KEY", default=Config.api_key, help="Require 'Authorization: Bearer KEY'.")
@click.option("--parallel", default=Config.parallel, show_default=True, type=click.IntRange(1, 4096),
              envvar="FLEET_PARALLEL", help="Requests a node runs at once per model when it does not report num_parallel.")
@click.option("--no-mdns", is_flag=True, envvar="FLEET_NO_MDNS", help="Do not advertise _herd._tcp on mDNS.")
@click.option("--no-local", is_flag=True, envvar="FLEET_NO_LOCAL",
              help="Do not serve http://localhost:11434 as node 'local' when no node is configured.")
@click.option("--log-level", default=Config.log_level, show_default=True, envvar="FLEET_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--poll-interval", default=Config.poll_interval, show_default=True, type=click.FloatRange(0.05, 3600),
              envvar="FLEET_POLL_INTERVAL", help="Seconds between polls of --node (agentless) nodes.")
@click.option("--queue-timeout", default=Config.queue_timeout, show_default=True, type=click.FloatRange(0.1),
              envvar="FLEET_QUEUE_TIMEOUT", help="Seconds a request may wait for a free slot.")
@click.option("--max-queue", default=Config.max_queue, show_default=True, type=click.IntRange(0),
              envvar="FLEET_MAX_QUEUE", help="Requests that may wait for a slot at once.")
@click.option("--stall-timeout", default=Config.stall_timeout, show_default=True, type=click.FloatRange(1),
              envvar="FLEET_STALL_TIMEOUT", help="Seconds without a byte before a request is reaped.")
@click.option("--context-protection", default=Config.context_protection,
              show_default="the stored setting, strip at first",
              envvar="FLEET_CONTEXT_PROTECTION", type=click.Choice(CONTEXT_POLICIES),
              help="What to do with num_ctx that would force a reload.")
@click.option("--connect-timeout", default=Config.connect_timeout, show_default=True, type=click.FloatRange(0.1),
              envvar="FLEET_CONNECT_TIMEOUT", help="Seconds to connect to a node before trying another.")
@click.option("--first-byte-timeout", default=Config.first_byte_timeout, show_default=True,
              type=click.FloatRange(0.1), envvar="FLEET_FIRST_BYTE_TIMEOUT",
              help="Seconds a streaming request may wait for its first byte (a cold load) before another node is tried.")
@click.option("--idle-timeout", default=Config.idle_timeout, show_default=True, type=click.FloatRange(0.1),
              envvar="FLEET_IDLE_TIMEOUT", help="Longest silence between chunks of a running stream.")
@click.option("--trace-retention-days", "retention_days", default=Config.retention_days, show_default=True,
              type=click.FloatRange(0.01), envvar="FLEET_TRACE_RETENTION_DAYS", help="Trace rows older than this are pruned.")
@click.option("--drain-timeout", default=Config.drain_timeout, show_default=True, type=click.FloatRange(0),
              envvar="FLEET_DRAIN_TIMEOUT", help="On SIGTERM or Ctrl-C, seconds running requests get to finish.")
@click.option("--max-body-mb", default=Config.max_body_mb, show_default=True, type=click.FloatRange(0.01),
              envvar="FLEET_MAX_BODY_MB", help="Largest request body accepted.")
@click.pass_context
def main(ctx, node_specs, no_mdns, no_local, data_dir, **options):
    """herd: one Ollama/OpenAI endpoint that routes each request to the best Ollama node.

    Alone, `herd` runs the router. `herd status|models|health|traces` read a running router."""
    if ctx.invoked_subcommand is not None:
        return
    specs = list(node_specs) or [s for s in os.environ.get("FLEET_NODES", "").split(",") if s.strip()]
    nodes = [parse_node(spec) for spec in specs]
    names = [name for name, _ in nodes]
    if len(set(names)) != len(names):
        raise click.BadParameter("two nodes have the same name; name them: --node gpu=http://...",
                                 param_hint="--node")
    config = Config(nodes=nodes, mdns=not no_mdns, local=not no_local, data_dir=data_dir.expanduser(), **options)
    try:
        setup_logging(config.data_dir, config.log_level)
        app = create_app(config)
    except (OSError, sqlite3.Error) as exc:
        raise click.ClickException(f"cannot use data dir {config.data_dir}: {exc}") from None
    try:
        server = make_server(app, config)
    except OSError as exc:
        app.herd.shutdown()
        raise click.ClickException(f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc}); "
                                   "is another herd running? Pick another --port") from None
    where = ", ".join(f"{n}={u}" for n, u in nodes) or ("agents (mDNS) and http://localhost:11434"
                                                         if config.local else "agents (mDNS)")
    click.echo(f"herd {__version__} listening on http://{config.host}:{server.effective_port} "
               f"({config.threads} threads); nodes: {where}; data: {config.data_dir}")
    if not config.api_key and not is_loopback(config.host):
        log.warning("listening on %s without --api-key: anyone on the network can use this router; "
                    "pull, delete and settings are limited to this machine", config.host)
    app.herd.advertise(server.effective_port)
    stop_on_signals(app.herd)
    try:
        server.run()
    finally:
        app.herd.shutdown()
        click.echo("herd stopped; traces flushed")



# -- reading a running router from the terminal ------------------------------------------------

def router_get(url, key, path, **params):
    """GET a running router's JSON API; a clear message (exit 1) when it cannot be read."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        answer = requests.get(url.rstrip("/") + path, params=params, headers=headers, timeout=10)
    except requests.RequestException:
        raise click.ClickException(f"herd is not reachable at {url}: start `herd` there, or pass "
                                   "--router-url") from None
    if answer.status_code == 401:
        raise click.ClickException("the router needs its API key: pass --api-key or set FLEET_API_KEY")
    if answer.status_code != 200:
        raise click.ClickException(f"{path} answered {answer.status_code}: {answer.text[:200]}")
    return answer.json()


def reader(function):
    """The options every terminal view takes: where the router is, its key, JSON output."""
    function = click.option("--json", "as_json", is_flag=True, help="Print the router's JSON as it is.")(function)
    function = click.option("--api-key", envvar="FLEET_API_KEY", default=None, help="The router's --api-key.")(function)
    return click.option("--router-url", envvar="FLEET_ROUTER_URL", default="http://localhost:11435", show_default=True,
                        help="The running router to read.")(function)


def show(data, as_json, lines):
    click.echo(json.dumps(data, indent=2) if as_json else "\n".join(lines))


def seconds_text(ms):
    if ms is None:
        return "-"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def ago(timestamp):
    if not timestamp:
        return "-"
    seconds = max(0, time.time() - timestamp)
    return f"{seconds:.0f} s ago" if seconds < 90 else f"{seconds / 60:.0f} min ago" if seconds < 5400 \
        else f"{seconds / 3600:.0f} h ago"


def table(rows, header):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return [("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths))).rstrip()
            for line in [header, *rows]]


def expiry_text(expires_at):
    """When Ollama unloads a model, for people: ', until 14:05' (local time), ', kept loaded' (a
    keep_alive of -1 shows a date centuries away), or nothing when unknown or past."""
    if not isinstance(expires_at, str):
        return ""
    text = re.sub(r"(\.\d{6})\d+", r"\1", expires_at.replace("Z", "+00:00"))  # Go writes nanoseconds
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return ""
    if when.tzinfo is None:
        when = when.astimezone()
    seconds = when.timestamp() - time.time()
    if seconds > 365 * 86400:
        return ", kept loaded"
    if seconds <= 0:
        return ""
    local = when.astimezone()
    return f", until {local:%H:%M}" if seconds < 86400 else f", until {local:%Y-%m-%d %H:%M}"


@main.command(name="status")
@reader
def status_command(router_url, api_key, as_json):
    """Nodes, the models they have loaded (context, expiry), requests running and queued."""
    data = router_get(router_url, api_key, "/fleet/status")
    fleet = data["fleet"]
    lines = [f"{fleet['nodes_online']} of {fleet['nodes_total']} nodes online; {fleet['requests_active']} "
             f"running, {fleet['requests_queued']} queued"]
    rows = []
    for node in data["nodes"]:
        loaded = ", ".join(f"{m['name']} ({m['context_length'] or '?'} ctx, {m['requests_active']} running"
                           f"{expiry_text(m.get('expires_at'))})"
                           for m in node["models_loaded"]) or "-"
        rows.append([node["node_id"], node["status"], node["requests_active"], ago(node["last_seen"]), loaded])
    show(data, as_json, lines + table(rows, ["NODE", "STATUS", "RUNNING", "SEEN", "LOADED"]))


@main.command(name="models")
@reader
@click.option("--hours", default=24.0, show_default=True, help="The range the figures cover.")
def models_command(router_url, api_key, as_json, hours):
    """Per model: requests, errors, latency, time to first token, speed, the nodes that served it."""
    data = router_get(router_url, api_key, "/dashboard/api/models", hours=hours)
    rows = [[m["model"], m["requests"], m["errors"], seconds_text(m["latency_p50_ms"]), seconds_text(m["latency_p95_ms"]),
             seconds_text(m["ttft_p50_ms"]), f"{m['decode_tps']:g}" if m["decode_tps"] else "-",
             ", ".join(n["node_id"] for n in m["nodes"])] for m in data["models"]]
    show(data, as_json, [f"last {hours:g} h"] + table(rows, ["MODEL", "REQUESTS", "ERRORS", "P50", "P95", "TTFT P50",
                                                            "TOK/S", "NODES"]))


@main.command(name="health")
@reader
@click.option("--hours", default=24.0, show_default=True, help="The range the figures cover.")
def health_command(router_url, api_key, as_json, hours):
    """The fleet's health score and what to fix, most urgent first."""
    data = router_get(router_url, api_key, "/dashboard/api/health", hours=hours)
    lines = [f"health {data['score']}/100"]
    for finding in data["findings"]:
        lines += [f"[{finding['severity']}] {finding['title']}: {finding['evidence']}", f"    fix: {finding['fix']}"]
    show(data, as_json, lines if data["findings"] else lines + ["nothing to fix"])


@main.command(name="traces")
@reader
@click.option("-n", "limit", default=20, show_default=True, help="How many of the newest requests.")
def traces_command(router_url, api_key, as_json, limit):
    """The newest requests: where each went and how it ended."""
    data = router_get(router_url, api_key, "/dashboard/api/traces", limit=limit)
    rows = [[ago(t["timestamp"]), t["model"] or "-", t["node_id"] or "-", t["status"], seconds_text(t["latency_ms"]),
             seconds_text(t["time_to_first_token_ms"]), t["completion_tokens"] or "-", t["app"] or "-"]
            for t in data["traces"]]
    show(data, as_json, table(rows, ["WHEN", "MODEL", "NODE", "STATUS", "LATENCY", "TTFT", "TOKENS", "APP"]))


if __name__ == "__main__":
    main()

"""herd-node: the agent that reports one Ollama machine to a herd router.

Run it beside each Ollama, with no flags: it finds the router over mDNS (`_herd._tcp.local.`),
then every few seconds posts what this machine has: Ollama's models (installed and loaded, with
context length), memory, CPU and GPU, and how many requests Ollama runs in parallel.

    python herd_node.py                                  # discover the router
    python herd_node.py --router-url http://router:11435 --memory-gb 16

Sections: settings -> collectors (Ollama, host, GPU) -> address -> heartbeat loop -> discovery -> CLI.
"""

from __future__ import annotations

import ipaddress
import logging
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import click
import psutil
import requests

__version__ = "0.1.0"

log = logging.getLogger("herd-node")


# =============================================================================================
# Settings
# =============================================================================================

DEFAULT_OLLAMA = "http://localhost:11434"
SERVICE_TYPE = "_herd._tcp.local."
OLLAMA_TIMEOUT = 3.0  # a local Ollama that takes longer than this is in trouble
POST_TIMEOUT = 5.0
# While the router is down, tries slow to one every 8 intervals (at most a minute), so a router
# that comes back is found again soon without a node hammering one that stays down.
MAX_BACKOFF_INTERVALS = 8
REDISCOVER_AFTER = 3  # failed heartbeats before an agent that found its router over mDNS looks again
MAX_BACKOFF_S = 60.0
GB = 1024 ** 3


@dataclass
class AgentConfig:
    router_url: str | None = None  # None: discover over mDNS
    ollama_host: str = DEFAULT_OLLAMA
    node_id: str = field(default_factory=socket.gethostname)
    interval: float = 5.0
    api_key: str | None = None
    num_parallel: int | None = None
    memory_gb: float | None = None
    context_length: int | None = None  # None: Ollama's OLLAMA_CONTEXT_LENGTH if readable
    mdns_interfaces: list | None = None  # None: all interfaces
    discovery_timeout: float = 10.0


# =============================================================================================
# Collectors: each returns plain data and never raises into the loop
# =============================================================================================

# The router checks every heartbeat whole and refuses one with a wrong type anywhere, which would
# make this node vanish; so the agent sends only values it checked against the router's limits.
MAX_MODELS = 10_000  # models the router takes per answer
MAX_NAME_CHARS = 256  # a model name
MAX_DESCRIPTION_CHARS = 128  # a digest, a date, a value in a model's details, a GPU's name
MAX_FAMILIES = 16  # families the router keeps per model
MAX_VERSION_CHARS = 64
MAX_MODEL_BYTES = 1 << 50  # a petabyte: past any model, so a bigger size is a broken answer
MAX_CONTEXT = 1 << 24  # the router's ceiling for a context length
MAX_MEMORY_GB = 1 << 20  # a petabyte: past any one machine
MAX_GPUS = 64
MAX_HOSTNAME_CHARS = 255
MAX_ERROR_CHARS = 2000


class UnusableAnswer(ValueError):
    """Ollama answered, but not with what Ollama sends; the message says where and what."""


def printable(text, max_chars):
    """`text` with each unprintable character replaced by '?', cut to `max_chars`."""
    return "".join(c if c.isprintable() else "?" for c in text)[:max_chars]


def usable_text(value, max_chars):
    """`value` when it is a printable, non-blank string of at most `max_chars`, else None."""
    if isinstance(value, str) and value.strip() and len(value) <= max_chars and value.isprintable():
        return value
    return None


def number_within(value, low, high):
    """`value` as a float when it is a number in [low, high] (NaN compares false), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        return None
    return float(value)


def shown(value):
    """A value as an error message shows it: JSON's words for null and booleans, cut short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def whole_number(value, where, low, high):
    """A whole number in [low, high] (8192.0 counts as 8192); raises UnusableAnswer."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnusableAnswer(f"{where} is {shown(value)}, not a whole number")
    if not low <= value <= high:
        raise UnusableAnswer(f"{where} is {value}, not a whole number from {low} to {high}")
    return value


def usable_details(details):
    """A model's `details` as the router takes them: short printable strings, and its families."""
    clean = {key: value for key, value in details.items()
             if usable_text(key, MAX_DESCRIPTION_CHARS) and usable_text(value, MAX_DESCRIPTION_CHARS)}
    families = details.get("families")
    if isinstance(families, list):
        clean["families"] = [f for f in families if usable_text(f, MAX_DESCRIPTION_CHARS)][:MAX_FAMILIES]
    return clean


def check_model_entry(entry, where, loaded):
    """One /api/tags (or, `loaded`, /api/ps) entry with only the fields the router reads. What
    the router plans with (name, size, size_vram, context_length) must be right, or this raises
    UnusableAnswer; a description that is not (a digest, a date, a detail) is dropped."""
    if not isinstance(entry, dict):
        raise UnusableAnswer(f"{where} is {shown(entry)}, not an object")
    name = entry.get("name") or entry.get("model")  # the router reads them so
    clean = {"name": name, "model": entry.get("model") or name}
    for key, value in clean.items():
        if usable_text(value, MAX_NAME_CHARS) is None:
            raise UnusableAnswer(f"{where}.{key} is {shown(value)}, not a model name "
                                 f"(printable, at most {MAX_NAME_CHARS} characters)")
    size = entry.get("size")
    clean["size"] = 0 if size is None else whole_number(size, f"{where}.size", 0, MAX_MODEL_BYTES)
    for key in ("digest", "modified_at") + (("expires_at",) if loaded else ()):
        text = usable_text(entry.get(key), MAX_DESCRIPTION_CHARS)
        if text is not None:
            clean[key] = text
    if loaded:
        if entry.get("size_vram") is not None:
            clean["size_vram"] = whole_number(entry["size_vram"], f"{where}.size_vram", 0, MAX_MODEL_BYTES)
        if entry.get("context_length") not in (None, 0):  # 0: this Ollama does not say
            clean["context_length"] = whole_number(entry["context_length"], f"{where}.context_length",
                                                   1, MAX_CONTEXT)
    if isinstance(entry.get("details"), dict):
        clean["details"] = usable_details(entry["details"])
    return clean


def check_models(answer, path, loaded=False):
    """The checked `models` of Ollama's answer to /api/tags (or, `loaded`, /api/ps); raises
    UnusableAnswer naming the first thing Ollama would not have sent."""
    if not isinstance(answer, dict):
        raise UnusableAnswer(f"{path} is {shown(answer)}, not an object")
    models = answer.get("models")
    if models is None:
        return []
    if not isinstance(models, list):
        raise UnusableAnswer(f"{path} models is {shown(models)}, not a list")
    if len(models) > MAX_MODELS:
        raise UnusableAnswer(f"{path} lists {len(models)} models, more than the {MAX_MODELS} herd takes")
    return [check_model_entry(entry, f"{path} models[{i}]", loaded) for i, entry in enumerate(models)]


def check_version(answer):
    """Ollama's version from its /api/version answer, or None when it names none herd can show."""
    if not isinstance(answer, dict):
        raise UnusableAnswer(f"/api/version is {shown(answer)}, not an object")
    return usable_text(answer.get("version"), MAX_VERSION_CHARS)


def fetch_json(session, url, path):
    """Ollama's JSON answer to GET `path`: an HTTP error raises, a body that is not JSON is unusable."""
    response = session.get(url + path, timeout=OLLAMA_TIMEOUT)
    response.raise_for_status()
    try:
        return response.json()
    except (ValueError, RecursionError):
        raise UnusableAnswer(f"{path} is not JSON") from None


def collect_ollama(session, url):
    """The heartbeat's `ollama` block: reachable, version, models (/api/tags), loaded (/api/ps),
    each checked; an Ollama that answers what herd cannot use is reported as not reachable."""
    try:
        version = check_version(fetch_json(session, url, "/api/version"))
        models = check_models(fetch_json(session, url, "/api/tags"), "/api/tags")
        loaded = check_models(fetch_json(session, url, "/api/ps"), "/api/ps", loaded=True)
        return {"reachable": True, "version": version, "models": models, "loaded": loaded}
    except UnusableAnswer as exc:
        error = f"Ollama at {url} answered something herd cannot use: {exc}"
    except requests.Timeout:
        error = f"Ollama at {url} did not answer within {OLLAMA_TIMEOUT:g} s"
    except requests.ConnectionError as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else f"cannot connect ({exc})"
        error = f"Ollama at {url}: {reason}; is `ollama serve` running?"
    except Exception as exc:  # noqa: BLE001 - a collector must never take the agent down
        error = f"Ollama at {url} answered oddly: {exc}"
    return {"reachable": False, "error": printable(error, MAX_ERROR_CHARS)}


class CpuSampler:
    """psutil.cpu_percent blocks for its interval (or says 0.0 at first): sample in a thread."""

    def __init__(self, period=1.0):
        self.value = None
        self.period = period
        self.stop = threading.Event()
        threading.Thread(target=self._run, name="herd-node-cpu", daemon=True).start()

    def _run(self):
        while not self.stop.is_set():
            try:
                self.value = psutil.cpu_percent(interval=self.period)
            except Exception:  # noqa: BLE001 - a sampler must never take the agent down
                self.stop.wait(self.period)


def usable_hostname(name):
    """A hostname as the router takes it: printable, at most 255 characters; None when blank."""
    name = printable(name, MAX_HOSTNAME_CHARS)
    return name if name.strip() else None


def collect_host(sampler):
    """This machine's name, memory (GB) and CPU use; a number that is not sane is None."""
    try:
        memory = psutil.virtual_memory()
        memory = {"total_gb": number_within(round(memory.total / GB, 2), 0, MAX_MEMORY_GB),
                  "available_gb": number_within(round(memory.available / GB, 2), 0, MAX_MEMORY_GB)}
    except Exception:  # noqa: BLE001
        memory = None
    try:
        hostname = usable_hostname(socket.gethostname())
    except OSError:
        hostname = None
    return {"hostname": hostname, "memory": memory, "cpu_percent": number_within(sampler.value, 0, 100)}


NVIDIA_QUERY = ["nvidia-smi", "--query-gpu=name,memory.total,memory.used", "--format=csv,noheader,nounits"]


def parse_nvidia_smi(text):
    """`nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits` (MiB)."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            total, used = (number_within(float(mib), 0, MAX_MEMORY_GB * 1024) for mib in parts[-2:])
        except ValueError:  # [N/A], [Not Supported]
            continue
        if total is None or used is None:  # NaN, negative or absurd: this GPU's memory is not known
            continue
        gpus.append({"name": printable(",".join(parts[:-2]), MAX_DESCRIPTION_CHARS),
                     "vram_total_gb": round(total / 1024, 2), "vram_used_gb": round(used / 1024, 2)})
    gpus = gpus[:MAX_GPUS]
    if not gpus:
        return None
    return {"kind": "nvidia", "gpus": gpus,
            "vram_total_gb": number_within(round(sum(g["vram_total_gb"] for g in gpus), 2), 0, MAX_MEMORY_GB),
            "vram_used_gb": number_within(round(sum(g["vram_used_gb"] for g in gpus), 2), 0, MAX_MEMORY_GB)}


def apple_unified_memory(system, machine, total_bytes):
    """Apple Silicon shares system memory with the GPU: report it as unified VRAM."""
    if system == "Darwin" and machine in ("arm64", "aarch64"):
        return {"kind": "apple", "unified": True,
                "vram_total_gb": number_within(round(total_bytes / GB, 2), 0, MAX_MEMORY_GB), "vram_used_gb": None}
    return None


def collect_gpu():
    """NVIDIA through nvidia-smi, Apple unified memory, or None (no guess)."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(NVIDIA_QUERY, capture_output=True, text=True, timeout=5, check=True).stdout
            gpu = parse_nvidia_smi(out)
            if gpu:
                return gpu
        except (OSError, subprocess.SubprocessError, ValueError):  # ValueError: not in the locale's encoding
            pass
    try:
        return apple_unified_memory(platform.system(), platform.machine(), psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001
        return None


# The whole numbers the router takes for the settings the agent reads from Ollama's environment.
OLLAMA_SETTING_RANGES = {"OLLAMA_NUM_PARALLEL": (1, 4096), "OLLAMA_CONTEXT_LENGTH": (256, MAX_CONTEXT)}


def ollama_setting(name):
    """A whole-number setting (OLLAMA_NUM_PARALLEL, OLLAMA_CONTEXT_LENGTH) from the running
    Ollama server's environment, when this user may read it and the router would take it; else None."""
    low, high = OLLAMA_SETTING_RANGES[name]
    try:
        for proc in psutil.process_iter(["name"]):
            if (proc.info.get("name") or "").lower().startswith("ollama"):
                try:
                    value = proc.environ().get(name)
                except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
                    continue
                if value and value.strip().isdigit() and low <= int(value) <= high:
                    return int(value)
    except Exception:  # noqa: BLE001
        pass
    return None


def memory_budget_gb(flag, gpu, memory):
    """What the router may plan models into: the flag, else VRAM (or unified memory), else RAM."""
    if flag:
        return float(flag)
    if gpu and gpu.get("vram_total_gb"):
        return gpu["vram_total_gb"]
    if memory and memory.get("total_gb"):
        return memory["total_gb"]
    return None


# =============================================================================================
# Address: the URL the router should use for this Ollama
# =============================================================================================

def is_loopback_host(host):
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_toward(router_url):
    """This machine's address on the route to the router (no packet is sent)."""
    host = urlsplit(router_url).hostname
    port = urlsplit(router_url).port or 11435
    try:
        target = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            return probe.getsockname()[0]
    except OSError:
        return None


def ollama_url_for_router(ollama_host, router_url):
    """The agent's LAN address in place of localhost, unless the router runs on this host."""
    parts = urlsplit(ollama_host)
    if not is_loopback_host(parts.hostname):
        return ollama_host.rstrip("/")
    mine = address_toward(router_url)
    if mine is None or is_loopback_host(mine):  # the router is on this machine
        return ollama_host.rstrip("/")
    netloc = f"{mine}:{parts.port or 11434}"
    return urlunsplit((parts.scheme or "http", netloc, "", "", "")).rstrip("/")


def reachable(url, timeout=1.0):
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout):
            return True
    except OSError:
        return False


# =============================================================================================
# Heartbeat loop
# =============================================================================================

def router_refusal(response):
    """Why the router did not take a heartbeat: its status and its JSON error text (herd answers
    `{"error": "..."}`, naming the field it refused)."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):  # the OpenAI shape, should a proxy in front of herd answer so
        error = error.get("message")
    text = error if isinstance(error, str) and error.strip() else response.text[:500] or "(no reason given)"
    return f"router answered {response.status_code} to the heartbeat: {printable(text, 500)}"


class Agent:
    """Collects and posts a heartbeat every interval; backs off while the router is down."""

    def __init__(self, config):
        self.config = config
        self.session = requests.Session()
        self.session.trust_env = False
        self.cpu = CpuSampler()
        self.stop_event = threading.Event()
        self.router_url = config.router_url.rstrip("/") if config.router_url else None
        self.router_up = None  # unknown until the first post
        self.router_problem = None  # why the last post failed, logged once per change
        self.ollama_up = None
        self.ollama_problem = None
        self.warned_loopback = False
        self.num_parallel = config.num_parallel or ollama_setting("OLLAMA_NUM_PARALLEL")
        self.context_length = config.context_length or ollama_setting("OLLAMA_CONTEXT_LENGTH")
        self.thread = None

    # -- one heartbeat ----------------------------------------------------------------------

    def payload(self):
        ollama = collect_ollama(self.session, self.config.ollama_host.rstrip("/"))
        host = collect_host(self.cpu)
        gpu = collect_gpu()
        return {"node_id": self.config.node_id, "hostname": host["hostname"],
                "ollama_url": ollama_url_for_router(self.config.ollama_host, self.router_url),
                "memory": host["memory"], "gpu": gpu, "cpu_percent": host["cpu_percent"],
                "num_parallel": self.num_parallel, "default_context_length": self.context_length,
                "memory_budget_gb": memory_budget_gb(self.config.memory_gb, gpu, host["memory"]),
                "interval_s": self.config.interval, "ollama": ollama, "agent_version": __version__}

    def beat(self):
        """Collect and post once; returns True when the router took it."""
        body = self.payload()
        self._note_ollama(body)
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        try:
            response = self.session.post(self.router_url + "/heartbeat", json=body, headers=headers,
                                         timeout=POST_TIMEOUT)
            problem = None if response.status_code == 200 else router_refusal(response)
        except requests.RequestException as exc:
            problem = f"cannot reach router at {self.router_url} ({type(exc).__name__})"
        ok = problem is None
        if ok != self.router_up or problem != self.router_problem:  # one line per change, not per attempt
            if ok:
                log.info("reporting %s (%s) to %s every %g s", self.config.node_id, body["ollama_url"],
                         self.router_url, self.config.interval)
            else:
                log.warning("%s; will keep trying", problem)
            self.router_up, self.router_problem = ok, problem
        return ok

    def _note_ollama(self, body):
        ollama = body["ollama"]
        up = ollama["reachable"]
        problem = None if up else ollama["error"]
        if up != self.ollama_up or problem != self.ollama_problem:  # one line per change, not per beat
            if up:
                log.info("Ollama %s answers with %d models", ollama["version"] or "(version unknown)",
                         len(ollama["models"]))
            else:
                log.warning("%s; will keep trying", problem)
            self.ollama_up, self.ollama_problem = up, problem
        advertised = body["ollama_url"]
        if up and not self.warned_loopback and advertised != self.config.ollama_host.rstrip("/"):
            if not reachable(advertised):
                log.warning("Ollama listens on 127.0.0.1 only, so the router cannot reach it at %s: set "
                            "OLLAMA_HOST=0.0.0.0 on this machine and restart Ollama", advertised)
            self.warned_loopback = True

    # -- the loop ---------------------------------------------------------------------------

    def run(self):
        discovered = self.router_url is None
        if discovered:
            self.router_url = self._discover()
            if self.router_url is None:
                return
        failures = 0
        while not self.stop_event.is_set():
            started = time.monotonic()
            failures = 0 if self.beat() else failures + 1
            if discovered and failures == REDISCOVER_AFTER:  # the router may have moved: look again
                found = discover_router(self.config.discovery_timeout, self.config.mdns_interfaces, self.stop_event)
                if found and found != self.router_url:
                    log.info("router moved: now %s (found over mDNS)", found)
                    self.router_url, failures, self.router_up = found, 0, None
                    continue
            pause = self.config.interval * min(2 ** failures, MAX_BACKOFF_INTERVALS) if failures else self.config.interval
            self.stop_event.wait(max(0.0, min(pause, MAX_BACKOFF_S) - (time.monotonic() - started)))

    def _discover(self):
        announced = False
        while not self.stop_event.is_set():
            url = discover_router(self.config.discovery_timeout, self.config.mdns_interfaces, self.stop_event)
            if url:
                log.info("found router %s over mDNS", url)
                return url
            if not announced:
                log.warning("no herd router found over mDNS yet; still looking (or pass --router-url)")
                announced = True
        return None

    def start(self):
        self.thread = threading.Thread(target=self.run, name="herd-node", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.stop_event.set()
        self.cpu.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)


# =============================================================================================
# Discovery: browse mDNS for the router's _herd._tcp service
# =============================================================================================

def discover_router(timeout, interfaces=None, stop_event=None):
    """The first herd router advertised on the network, as http://addr:port, or None."""
    from zeroconf import InterfaceChoice, ServiceBrowser, ServiceStateChange, Zeroconf

    found = []
    event = threading.Event()
    zc = Zeroconf(interfaces=interfaces or InterfaceChoice.All)

    def on_change(zeroconf, service_type, name, state_change):
        if state_change is not ServiceStateChange.Added or found:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=3000)
        if info and info.port:
            addresses = info.parsed_addresses()
            if addresses:
                host = addresses[0]
                found.append(f"http://{'[' + host + ']' if ':' in host else host}:{info.port}")
                event.set()

    try:
        ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        deadline = time.monotonic() + timeout
        while not event.is_set() and time.monotonic() < deadline:
            if stop_event is not None and stop_event.is_set():
                break
            event.wait(0.1)
    finally:
        zc.close()
    return found[0] if found else None


# =============================================================================================
# Command line
# =============================================================================================

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--router-url", envvar="FLEET_NODE_ROUTER_URL", default=None,
              help="The herd router, e.g. http://router:11435 (default: find it over mDNS).")
@click.option("--ollama-host", envvar="FLEET_NODE_OLLAMA_HOST", default=DEFAULT_OLLAMA, show_default=True,
              help="This machine's Ollama.")
@click.option("--node-id", envvar="FLEET_NODE_NODE_ID", default=socket.gethostname(), show_default="hostname",
              help="The name the router shows for this machine.")
@click.option("--interval", envvar="FLEET_NODE_INTERVAL", default=5.0, show_default=True,
              type=click.FloatRange(0.1, 3600), help="Seconds between heartbeats.")
@click.option("--api-key", envvar="FLEET_NODE_API_KEY", default=None, help="The router's --api-key.")
@click.option("--num-parallel", envvar="FLEET_NODE_NUM_PARALLEL", default=None, type=click.IntRange(1, 4096),
              help="Requests Ollama runs at once per model (default: its OLLAMA_NUM_PARALLEL if readable).")
@click.option("--context-length", envvar="FLEET_NODE_CONTEXT_LENGTH", default=None,
              type=click.IntRange(256, MAX_CONTEXT),
              help="The context Ollama loads models with when a request does not set num_ctx (default: its "
                   "OLLAMA_CONTEXT_LENGTH if readable, which a service or container often is not).")
@click.option("--memory-gb", envvar="FLEET_NODE_MEMORY_GB", default=None, type=click.FloatRange(0.1),
              help="Memory the router may plan models into (default: VRAM, Apple unified memory, else RAM).")
@click.option("--mdns-interface", "mdns_interfaces", envvar="FLEET_NODE_MDNS_INTERFACE", multiple=True,
              help="Browse for the router on this interface address only (repeatable).")
@click.option("--log-level", envvar="FLEET_NODE_LOG_LEVEL", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(router_url, ollama_host, node_id, interval, api_key, num_parallel, context_length, memory_gb,
         mdns_interfaces, log_level):
    """herd-node: report this Ollama machine to the herd router."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s herd-node %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for url, flag in ((router_url, "--router-url"), (ollama_host, "--ollama-host")):
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint=flag)
    config = AgentConfig(router_url=router_url, ollama_host=ollama_host, node_id=node_id, interval=interval,
                         api_key=api_key, num_parallel=num_parallel, memory_gb=memory_gb,
                         context_length=context_length,
                         mdns_interfaces=list(mdns_interfaces) or None)
    agent = Agent(config)
    click.echo(f"herd-node {__version__}: node {node_id}, Ollama {ollama_host}, reporting to "
               f"{router_url or 'the router found over mDNS'} every {interval:g} s")

    def stop(signum, _frame):
        agent.stop_event.set()

    signal.signal(signal.SIGINT, stop)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, stop)
    agent.start()
    while agent.thread.is_alive():
        agent.thread.join(0.5)
    agent.stop()
    click.echo("herd-node stopped")


if __name__ == "__main__":
    main()

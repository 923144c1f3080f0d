"""Fixtures: fake Ollama nodes and real herd routers on free loopback ports."""

import sys
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import herd  # noqa: E402
from fake_ollama import FakeOllama  # noqa: E402


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


# -- requests the tests send ------------------------------------------------------------------

CHAT = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
OPENAI_CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def chat(router, body=CHAT, **kwargs):
    return requests.post(router.url + "/api/chat", json=body, timeout=30, **kwargs)


def heartbeat(router, node_id, fake, **fields):
    """Post what herd-node would post for `fake` (tests of the router need no agent)."""
    body = {"node_id": node_id, "ollama_url": fake.url, "hostname": node_id, "interval_s": 5,
            "memory": {"total_gb": 32, "available_gb": 20}, "gpu": None, "cpu_percent": 3.0,
            "num_parallel": None, "memory_budget_gb": 32,
            "ollama": {"reachable": True, "version": "0.12.0",
                       "models": [fake.tag_entry(m) for m in fake.models],
                       "loaded": [fake.ps_entry(m) for m in fake.loaded]}}
    body.update(fields)
    return requests.post(router.url + "/heartbeat", json=body, timeout=5)


# -- routers and fake nodes ------------------------------------------------------------------

class Router:
    """A real herd router on a loopback port, served by Waitress in a thread."""

    def __init__(self, config, calibrate=False):
        self.config = config
        self.app = herd.create_app(config)
        self.herd = self.app.herd
        # Calibration sends its own generation to each new node: off unless a test is about it,
        # so that tests can count what their fake nodes receive.
        self.herd.change_settings({"calibrate": calibrate})
        self.server = herd.make_server(self.app, config)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def stop(self):
        herd.stop_server(self.server)
        self.herd.shutdown()

    def status(self):
        """/fleet/status once the replies handed out have ended."""
        self.settled()
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        return requests.get(self.url + "/fleet/status", headers=headers, timeout=5).json()

    def wait_online(self, count):
        wait_for(lambda: self.status()["fleet"]["nodes_online"] >= count, what=f"{count} nodes online")

    def settled(self):
        """Once every whole reply a client has been handed has ended (herd learns from it and
        queues its row just after writing it)."""
        wait_for(lambda: all(e.replied_at is None for e in self.herd.proxy.running()), what="replies ended")

    def written(self):
        """Once every reply handed out has ended and the writer has committed its row."""
        self.settled()
        assert self.herd.traces.flush()

    def traces(self, sql="SELECT * FROM request_traces"):
        """Rows, once written (see written)."""
        self.written()
        return self.herd.traces.query(sql)


@pytest.fixture
def make_fake():
    fakes = []

    def make(**kwargs):
        fake = FakeOllama(**kwargs).start()
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.stop()


@pytest.fixture
def make_router(tmp_path):
    routers = []

    def make(nodes=(), calibrate=False, **overrides):
        settings = dict(host="127.0.0.1", port=0, data_dir=tmp_path / f"data{len(routers)}",
                        nodes=[(name, url) for name, url in nodes], threads=64, mdns=False,
                        local=False, poll_interval=0.2)
        settings.update(overrides)
        router = Router(herd.Config(**settings), calibrate)
        routers.append(router)
        if nodes:
            router.wait_online(len(nodes))
        return router

    yield make
    for router in routers:
        router.stop()

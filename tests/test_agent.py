"""herd-node against a fake Ollama and a real router, over loopback (mDNS bound to 127.0.0.1)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import herd_node
from conftest import ROOT, chat, wait_for

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def make_agent():
    agents = []

    def make(**settings):
        settings.setdefault("interval", 0.2)
        settings.setdefault("mdns_interfaces", ["127.0.0.1"])
        agent = herd_node.Agent(herd_node.AgentConfig(**settings)).start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop()


def advertised_router(make_router):
    """A router that announces itself over mDNS on 127.0.0.1."""
    router = make_router(mdns=True)
    router.herd.advertise(router.server.effective_port)
    return router


def node(router, node_id):
    for entry in router.status()["nodes"]:
        if entry["node_id"] == node_id:
            return entry
    return None


def test_agent_reports_models_memory_and_loads(make_fake, make_router, make_agent):
    fake = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.5})
    router = make_router()
    make_agent(router_url=router.url, ollama_host=fake.url, node_id="studio", num_parallel=4, memory_gb=16,
               context_length=32768)
    entry = wait_for(lambda: node(router, "studio"), what="node registered")
    assert entry["status"] == "online" and entry["ollama_url"] == fake.url  # same host: no LAN rewrite
    assert entry["models_available"] == ["llama3.2:latest", "qwen2.5:7b"]
    assert entry["num_parallel"] == 4 and entry["memory_budget_gb"] == 16
    assert entry["default_context_length"] == 32768
    assert entry["memory"]["total_gb"] > 0 and entry["models_loaded"] == []
    fake.loaded["qwen2.5:7b"] = 8192  # someone ran it locally
    loaded = wait_for(lambda: node(router, "studio")["models_loaded"], what="load seen")
    assert loaded == [{"name": "qwen2.5:7b", "size_vram": int(4.5 * 1024 ** 3), "context_length": 8192,
                       "requests_active": 0}]
    assert chat(router).headers["X-Herd-Node"] == "studio"


def test_stopped_agent_goes_offline_after_three_intervals_and_returns(make_fake, make_router, make_agent):
    fake = make_fake()
    router = make_router()
    agent = make_agent(router_url=router.url, ollama_host=fake.url, node_id="mini")
    wait_for(lambda: node(router, "mini"), what="registered")
    agent.stop()
    stopped = time.monotonic()
    wait_for(lambda: node(router, "mini")["status"] == "offline", timeout=3, what="offline")
    assert time.monotonic() - stopped >= 0.35  # not before it missed its intervals
    make_agent(router_url=router.url, ollama_host=fake.url, node_id="mini")
    wait_for(lambda: node(router, "mini")["status"] == "online", what="back online")


def test_agent_started_before_the_router_registers_once_it_is_up(make_fake, make_router, make_agent):
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake = make_fake()
    agent = make_agent(router_url=f"http://127.0.0.1:{port}", ollama_host=fake.url, node_id="early")
    time.sleep(0.6)
    assert agent.router_up is False
    router = make_router(port=port)
    wait_for(lambda: node(router, "early"), timeout=5, what="registered after router start")


def test_unreachable_ollama_is_reported_with_reason_and_not_routed(make_fake, make_router, make_agent):
    fake = make_fake()
    router = make_router()
    fake.stop()
    make_agent(router_url=router.url, ollama_host=fake.url, node_id="down")
    entry = wait_for(lambda: node(router, "down"), what="registered")
    assert entry["status"] == "degraded" and "connection refused" in entry["ollama_error"]
    assert chat(router).status_code == 503


def test_agent_finds_the_router_over_mdns_on_loopback(make_fake, make_router, make_agent):
    fake = make_fake()
    router = advertised_router(make_router)
    agent = make_agent(ollama_host=fake.url, node_id="found")
    wait_for(lambda: node(router, "found"), timeout=15, what="registered via mDNS")
    assert agent.router_url == router.url


def test_agent_cli_prints_summary_reports_and_stops_cleanly_on_sigterm(make_fake, make_router):
    fake = make_fake()
    router = make_router()
    proc = subprocess.Popen([sys.executable, str(ROOT / "herd_node.py"), "--router-url", router.url,
                             "--ollama-host", fake.url, "--node-id", "cli", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: node(router, "cli"), what="cli agent registered")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "node cli" in out and "herd-node stopped" in out
    assert err.count("reporting cli") == 1  # one line per state change, not per heartbeat


def test_agent_cli_rejects_a_bad_router_url():
    proc = subprocess.run([sys.executable, str(ROOT / "herd_node.py"), "--router-url", "ftp://x"],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2 and "not an http(s) URL" in proc.stderr


def test_nvidia_smi_csv_one_and_two_gpus():
    one = herd_node.parse_nvidia_smi((FIXTURES / "nvidia-smi-one.csv").read_text())
    assert one["vram_total_gb"] == 23.99 and one["vram_used_gb"] == 1.18 and len(one["gpus"]) == 1
    two = herd_node.parse_nvidia_smi((FIXTURES / "nvidia-smi-two.csv").read_text())
    assert two["vram_total_gb"] == 95.98 and two["vram_used_gb"] == 39.57
    assert [g["name"] for g in two["gpus"]] == ["NVIDIA RTX A6000"] * 2
    assert herd_node.parse_nvidia_smi("") is None
    assert herd_node.parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate") is None


def test_apple_unified_memory_and_none():
    apple = herd_node.apple_unified_memory("Darwin", "arm64", 64 * 1024 ** 3)
    assert apple["vram_total_gb"] == 64 and apple["unified"] is True
    assert herd_node.apple_unified_memory("Darwin", "x86_64", 16 * 1024 ** 3) is None
    assert herd_node.apple_unified_memory("Linux", "x86_64", 16 * 1024 ** 3) is None


def test_memory_budget_prefers_flag_then_vram_then_ram():
    memory = {"total_gb": 64.0, "available_gb": 30.0}
    assert herd_node.memory_budget_gb(16, {"vram_total_gb": 24}, memory) == 16
    assert herd_node.memory_budget_gb(None, {"vram_total_gb": 24}, memory) == 24
    assert herd_node.memory_budget_gb(None, None, memory) == 64


def test_ollama_url_is_rewritten_to_the_lan_address_only_for_a_remote_router():
    assert herd_node.ollama_url_for_router("http://localhost:11434", "http://127.0.0.1:11435") == \
        "http://localhost:11434"
    assert herd_node.ollama_url_for_router("http://10.1.2.3:11434", "http://127.0.0.1:11435") == \
        "http://10.1.2.3:11434"


@pytest.mark.skipif(not Path("/bin/sleep").exists() or sys.platform == "win32", reason="needs /bin/sleep")
def test_ollama_settings_are_read_from_the_running_ollama_process(tmp_path):
    """A process named ollama with OLLAMA_NUM_PARALLEL in its environment, as the agent finds it."""
    import shutil
    fake_ollama = tmp_path / "ollama"
    shutil.copy("/bin/sleep", fake_ollama)
    proc = subprocess.Popen([str(fake_ollama), "30"], env={**os.environ, "OLLAMA_NUM_PARALLEL": "6",
                                                           "OLLAMA_CONTEXT_LENGTH": "8192"})
    try:
        wait_for(lambda: herd_node.ollama_setting("OLLAMA_NUM_PARALLEL") == 6, timeout=5, what="setting read")
        assert herd_node.ollama_setting("OLLAMA_CONTEXT_LENGTH") == 8192
    finally:
        proc.kill()
        proc.wait()
    assert herd_node.ollama_setting("OLLAMA_NUM_PARALLEL") is None


def test_agent_sends_the_api_key_and_a_wrong_key_is_refused(make_fake, make_router, make_agent):
    fake = make_fake()
    router = make_router(api_key="k3y")
    wrong = make_agent(router_url=router.url, ollama_host=fake.url, node_id="wrong", api_key="nope")
    make_agent(router_url=router.url, ollama_host=fake.url, node_id="right", api_key="k3y")
    wait_for(lambda: node(router, "right"), what="agent with the key registered")
    assert node(router, "wrong") is None and wrong.router_up is False


def test_agent_that_discovered_its_router_follows_it_when_it_moves(make_fake, make_router, make_agent):
    fake = make_fake()
    first = advertised_router(make_router)
    agent = make_agent(ollama_host=fake.url, node_id="mover")
    wait_for(lambda: node(first, "mover"), timeout=15, what="registered with the first router")
    first.stop()
    second = advertised_router(make_router)
    wait_for(lambda: node(second, "mover"), timeout=30, what="registered with the second router")
    assert agent.router_url == second.url

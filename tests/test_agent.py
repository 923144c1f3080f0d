"""herd-node against a fake Ollama and a real router, over loopback (mDNS bound to 127.0.0.1)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

import herd
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
    assert loaded == [{"name": "qwen2.5:7b", "size_vram": int(4.5 * 1024 ** 3), "size": int(4.5 * 1024 ** 3),
                       "context_length": 8192, "expires_at": "2099-01-01T00:00:00Z", "requests_active": 0,
                       "conversations": 0}]
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


# -- what the agent takes from Ollama: checked, so the router never refuses a heartbeat -----------

DETAILS = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
           "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}
TAG = {"name": "llama3.2:latest", "model": "llama3.2:latest", "modified_at": "2025-10-01T12:00:00Z",
       "size": 2019393189, "digest": "sha256:a80c4f17acd5", "details": DETAILS}
PS = {**TAG, "expires_at": "2099-01-01T00:00:00Z", "size_vram": 2019393189, "context_length": 8192}
KEPT_DETAILS = {"format": "gguf", "family": "llama", "families": ["llama"], "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M"}  # parent_model "" says nothing: dropped
KEPT_TAG = {**TAG, "details": KEPT_DETAILS}
KEPT_PS = {**PS, "details": KEPT_DETAILS}

CLEANED = [
    # (what, entry as Ollama answered it, from /api/ps, entry as the heartbeat carries it)
    ("Ollama's own /api/tags entry", TAG, False, KEPT_TAG),
    ("Ollama's own /api/ps entry", PS, True, KEPT_PS),
    # fields herd does not read (a newer Ollama's) are not passed on
    ("unknown fields dropped", {**TAG, "capabilities": ["completion"], "remote_host": "x"}, False, KEPT_TAG),
    # /api/ps fields in a /api/tags entry mean nothing there
    ("loaded-only fields dropped from /api/tags", PS, False, KEPT_TAG),
    # only "model": the router reads name as name or model, so the name is the model
    ("no name: the model names it", {"model": "qwen3:8b", "size": 5}, False,
     {"name": "qwen3:8b", "model": "qwen3:8b", "size": 5}),
    # 5e9 is a whole number written as a float: 5000000000
    ("a whole size written as a float", {"name": "m", "size": 5e9}, False,
     {"name": "m", "model": "m", "size": 5000000000}),
    # no size: 0, as the router reads it
    ("no size", {"name": "m"}, False, {"name": "m", "model": "m", "size": 0}),
    # descriptions that are not short printable strings are dropped, not fatal
    ("odd digest and dates dropped", {"name": "m", "size": 1, "digest": 7, "modified_at": "",
                                      "expires_at": "x" * 129}, True, {"name": "m", "model": "m", "size": 1}),
    # format 3 is not a string, family has a newline, one family is a number: all dropped
    ("odd details dropped", {"name": "m", "size": 1, "details": {"format": 3, "family": "ll\nama",
                                                                 "families": ["llama", 7, "x\n"]}}, False,
     {"name": "m", "model": "m", "size": 1, "details": {"families": ["llama"]}}),
    ("details not an object dropped", {"name": "m", "size": 1, "details": "gguf"}, False,
     {"name": "m", "model": "m", "size": 1}),
    # 20 families: the router keeps 16
    ("families cut to 16", {"name": "m", "size": 1, "details": {"families": [f"f{i}" for i in range(20)]}}, False,
     {"name": "m", "model": "m", "size": 1, "details": {"families": [f"f{i}" for i in range(16)]}}),
    # context_length 0 is Ollama not saying; size_vram 0 is a model in system RAM
    ("context 0 means unknown", {"name": "m", "size": 1, "size_vram": 0, "context_length": 0}, True,
     {"name": "m", "model": "m", "size": 1, "size_vram": 0}),
]


@pytest.mark.parametrize("what, entry, loaded, expected", CLEANED, ids=[row[0] for row in CLEANED])
def test_ollama_entries_keep_only_what_the_router_reads(what, entry, loaded, expected):
    path = "/api/ps" if loaded else "/api/tags"
    assert herd_node.check_models({"models": [entry]}, path, loaded) == [expected]


TOO_BIG = 1 << 50  # bytes: past any model
UNUSABLE = [
    # (what, path, Ollama's answer, what the error says)
    ("a list, not an object", "/api/tags", [TAG], "/api/tags is a list, not an object"),
    ("models not a list", "/api/tags", {"models": "llama3.2"}, "/api/tags models is 'llama3.2', not a list"),
    ("models an object", "/api/ps", {"models": {"m": PS}}, "/api/ps models is an object, not a list"),
    ("an entry not an object", "/api/tags", {"models": [TAG, "llama3.2"]},
     "/api/tags models[1] is 'llama3.2', not an object"),
    ("no name at all", "/api/tags", {"models": [{"size": 1}]}, "/api/tags models[0].name is null, not a model name"),
    ("a number for a name", "/api/tags", {"models": [{"name": 42}]}, "models[0].name is 42, not a model name"),
    ("a control character in the name", "/api/tags", {"models": [{"name": "x\ny"}]},
     r"models[0].name is 'x\ny', not a model name"),
    ("a name of 257 characters", "/api/tags", {"models": [{"name": "m" * 257}]},
     "not a model name (printable, at most 256 characters)"),
    ("a good name, a bad model", "/api/tags", {"models": [{"name": "m", "model": ["m"]}]},
     "models[0].model is a list, not a model name"),
    ("size a string", "/api/tags", {"models": [TAG, TAG, TAG, {**TAG, "size": "abc"}]},
     "/api/tags models[3].size is 'abc', not a whole number"),
    ("size a fraction", "/api/tags", {"models": [{**TAG, "size": 1.5}]}, "models[0].size is 1.5, not a whole number"),
    ("size true", "/api/tags", {"models": [{**TAG, "size": True}]}, "models[0].size is true, not a whole number"),
    ("size NaN", "/api/tags", {"models": [{**TAG, "size": float("nan")}]}, "models[0].size is nan, not a whole number"),
    ("size negative", "/api/tags", {"models": [{**TAG, "size": -1}]},
     f"models[0].size is -1, not a whole number from 0 to {TOO_BIG}"),
    ("size past a petabyte", "/api/tags", {"models": [{**TAG, "size": TOO_BIG + 1}]},
     f"models[0].size is {TOO_BIG + 1}, not a whole number from 0 to {TOO_BIG}"),
    ("size_vram an object", "/api/ps", {"models": [{**PS, "size_vram": {}}]},
     "/api/ps models[0].size_vram is an object, not a whole number"),
    ("context_length negative", "/api/ps", {"models": [{**PS, "context_length": -5}]},
     "/api/ps models[0].context_length is -5, not a whole number from 1 to 16777216"),
    ("10,001 models", "/api/tags", {"models": [TAG] * 10_001}, "/api/tags lists 10001 models, more than the 10000"),
]


@pytest.mark.parametrize("what, path, answer, error", UNUSABLE, ids=[row[0] for row in UNUSABLE])
def test_ollama_answers_herd_cannot_use_say_what_is_wrong(what, path, answer, error):
    with pytest.raises(herd_node.UnusableAnswer) as raised:
        herd_node.check_models(answer, path, loaded=path == "/api/ps")
    assert error in str(raised.value)


def test_ollama_version_and_empty_model_lists():
    assert herd_node.check_version({"version": "0.12.0"}) == "0.12.0"
    assert herd_node.check_version({"version": 12}) is None  # shown as unknown, not fatal
    assert herd_node.check_version({"version": "0." + "1" * 63}) is None  # 65 characters
    with pytest.raises(herd_node.UnusableAnswer, match="/api/version is '0.12.0', not an object"):
        herd_node.check_version("0.12.0")
    assert herd_node.check_models({"models": None}, "/api/ps") == []  # nothing loaded
    assert herd_node.check_models({}, "/api/ps") == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 64, 2 ** 64) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["llama3.2", "", " ", "x\r\ny", "\u202e", "bad\ud800", "m" * 300, 0, 1.0, -1]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12)
ENTRY_FIELDS = ["name", "model", "size", "digest", "modified_at", "expires_at", "size_vram", "context_length",
                "details"]
entries = st.fixed_dictionaries({}, optional={key: json_values for key in ENTRY_FIELDS}) | json_values
answers = st.fixed_dictionaries({}, optional={"models": st.lists(entries, max_size=3) | json_values}) | json_values


@settings(max_examples=300, deadline=None)
@given(answers, st.booleans())
def test_whatever_ollama_answers_the_agent_sends_nothing_the_router_refuses(answer, loaded):
    try:
        models = herd_node.check_models(answer, "/api/ps" if loaded else "/api/tags", loaded)
    except herd_node.UnusableAnswer:
        return  # reported as an Ollama herd cannot use
    block = {"reachable": True, "version": None, "loaded" if loaded else "models": models}
    herd.read_ollama_block(json.loads(json.dumps(block, allow_nan=False)))


HOSTNAMES = [
    # (what, what socket.gethostname() said, what the heartbeat carries)
    ("plain", "studio", "studio"),
    ("unprintable shown as ?", "bad\x00host", "bad?host"),
    ("cut to the router's 255", "h" * 300, "h" * 255),
    ("blank: no name", "   ", None),
    ("empty: no name", "", None),
]


@pytest.mark.parametrize("what, name, expected", HOSTNAMES, ids=[row[0] for row in HOSTNAMES])
def test_hostname_is_printable_and_short(what, name, expected):
    assert herd_node.usable_hostname(name) == expected


NUMBERS = [
    # (a CPU percentage, what the heartbeat carries: a number in 0..100 or null)
    (42.5, 42.5),
    (0, 0.0),
    (100, 100.0),
    (100.1, None),
    (-1.0, None),
    (float("nan"), None),
    (float("inf"), None),
    (True, None),
    ("5", None),
    (None, None),
]


@pytest.mark.parametrize("value, expected", NUMBERS)
def test_cpu_percent_is_a_number_from_0_to_100_or_null(value, expected):
    assert herd_node.collect_host(SimpleNamespace(value=value))["cpu_percent"] == expected


def test_nvidia_smi_numbers_that_are_not_memory_are_dropped():
    # 24576 MiB = 24.0 GB and 1024 MiB = 1.0 GB; the other GPUs' memory is nan, inf or negative
    text = "GPU A, 24576, 1024\nGPU B, nan, 0\nGPU C, inf, 0\nGPU D, -5, 0\nGPU\x07 E, 1024, [N/A]\n"
    assert herd_node.parse_nvidia_smi(text) == {
        "kind": "nvidia", "vram_total_gb": 24.0, "vram_used_gb": 1.0,
        "gpus": [{"name": "GPU A", "vram_total_gb": 24.0, "vram_used_gb": 1.0}]}
    assert herd_node.parse_nvidia_smi("GPU B, nan, nan") is None
    assert herd_node.parse_nvidia_smi("GPU\x07 F, 2048, 0")["gpus"][0]["name"] == "GPU? F"


def test_ollama_answering_garbage_shows_the_node_degraded_with_the_reason(make_fake, make_router, make_agent,
                                                                          caplog):
    fake = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.5})
    honest = fake.tag_entry
    fake.tag_entry = lambda name: {**honest(name), "size": "abc"} if name == "qwen2.5:7b" else honest(name)
    router = make_router()
    agent = make_agent(router_url=router.url, ollama_host=fake.url, node_id="odd")
    entry = wait_for(lambda: node(router, "odd"), what="registered")
    assert entry["status"] == "degraded"
    assert entry["ollama_error"] == (f"Ollama at {fake.url} answered something herd cannot use: "
                                     "/api/tags models[1].size is 'abc', not a whole number")
    assert chat(router).status_code == 503
    time.sleep(0.6)  # three more heartbeats
    assert agent.router_up is True
    messages = [record.getMessage() for record in caplog.records]
    assert sum("herd cannot use" in m for m in messages) == 1  # once, not per heartbeat
    assert not any("refused a heartbeat" in m for m in messages)
    del fake.tag_entry  # Ollama answers properly again
    wait_for(lambda: node(router, "odd")["status"] == "online", what="online again")
    assert node(router, "odd")["ollama_error"] is None


def test_refused_heartbeat_is_logged_once_with_the_routers_reason(make_fake, make_router, caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake = make_fake()
    agent = herd_node.Agent(herd_node.AgentConfig(router_url=f"http://127.0.0.1:{port}", ollama_host=fake.url,
                                                  node_id="n" * 65))  # the router takes 64 characters
    try:
        assert agent.beat() is False  # no router yet
        router = make_router(port=port)
        reason = requests.post(router.url + "/heartbeat", json=agent.payload(), timeout=5).json()["error"]
        for _ in range(3):
            assert agent.beat() is False
    finally:
        agent.stop()
    refusals = [r.getMessage() for r in caplog.records if "router answered" in r.getMessage()]
    assert refusals == [f"router answered 400 to the heartbeat: {reason}; will keep trying"]

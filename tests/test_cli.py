"""The router's command line: summary line, clear errors, clean shutdown."""

import signal
import socket
import sqlite3
import subprocess
import sys

import requests

from conftest import ROOT, wait_for


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(tmp_path, *args):
    return subprocess.Popen([sys.executable, str(ROOT / "herd.py"), "--host", "127.0.0.1", "--no-mdns",
                             "--no-local", "--data-dir", str(tmp_path), "--threads", "16", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_router_serves_then_flushes_traces_on_sigterm(make_fake, tmp_path):
    fake = make_fake()
    port = free_port()
    proc = start(tmp_path, "--port", str(port), "--node", f"box={fake.url}")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _online(url), timeout=15, what="router up with its node")
        for _ in range(40):
            assert requests.post(url + "/api/generate", json={"model": "llama3.2", "prompt": "x",
                                                                "stream": False}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert f"listening on http://127.0.0.1:{port}" in out and "box=" in out
    with sqlite3.connect(tmp_path / "latency.db") as db:
        assert db.execute("SELECT COUNT(*) FROM request_traces").fetchone()[0] == 40
    log_lines = (tmp_path / "logs" / "herd.jsonl").read_text().splitlines()
    assert any('"node box registered' in line for line in log_lines)


def _online(url):
    try:
        return requests.get(url + "/fleet/status", timeout=1).json()["fleet"]["nodes_online"] == 1
    except requests.RequestException:
        return False


def test_busy_port_exits_non_zero_with_a_clear_message(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = start(tmp_path, "--port", str(port))
        out, err = proc.communicate(timeout=20)
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_bad_node_flag_exits_non_zero(tmp_path):
    proc = start(tmp_path, "--node", "ftp://nope")
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "not a node URL" in err


def test_nodes_from_the_environment(make_fake, tmp_path):
    fake = make_fake()
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "herd.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**_env(), "FLEET_HOST": "127.0.0.1", "FLEET_PORT": str(port),
                                 "FLEET_NODES": f"envnode={fake.url}", "FLEET_NO_MDNS": "1",
                                 "FLEET_DATA_DIR": str(tmp_path), "FLEET_THREADS": "16"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _online(url), timeout=15, what="router up")
        assert requests.get(url + "/fleet/status").json()["nodes"][0]["node_id"] == "envnode"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def _env():
    import os
    return dict(os.environ)

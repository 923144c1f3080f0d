"""The router's command line: summary line, clear errors, clean shutdown."""

import concurrent.futures
import datetime
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
import requests

import herd
from conftest import ROOT, wait_for


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(tmp_path, *args):
    return subprocess.Popen([sys.executable, str(ROOT / "herd.py"), "--host", "127.0.0.1", "--no-mdns",
                             "--no-local", "--data-dir", str(tmp_path), "--threads", "16", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_with_node(tmp_path, fake, port=None):
    """herd on a free (or the given) port with `fake` as node `box`: (process, its URL)."""
    port = port or free_port()
    return start(tmp_path, "--port", str(port), "--node", f"box={fake.url}"), f"http://127.0.0.1:{port}"


def test_router_serves_then_flushes_traces_on_sigterm(make_fake, tmp_path):
    proc, url = start_with_node(tmp_path, make_fake())
    port = int(url.rsplit(":", 1)[1])
    try:
        send_generations(url, 40)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert f"listening on http://127.0.0.1:{port}" in out and "box=" in out
    with sqlite3.connect(tmp_path / "latency.db") as db:
        assert db.execute("SELECT COUNT(*) FROM request_traces").fetchone()[0] == 40
    log_lines = (tmp_path / "logs" / "herd.jsonl").read_text().splitlines()
    assert any('"node box registered' in line for line in log_lines)


def send_generations(url, count):
    """Once the router at `url` sees its node, `count` generations through it, each answered 200."""
    wait_for(lambda: _online(url), timeout=15, what="router up with its node")
    for _ in range(count):
        assert requests.post(url + "/api/generate", json={"model": "llama3.2", "prompt": "x",
                                                            "stream": False}).status_code == 200


def _online(url, count=1):
    try:
        return requests.get(url + "/fleet/status", timeout=1).json()["fleet"]["nodes_online"] == count
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


def test_sigterm_drains_running_requests_refuses_new_ones_and_loses_no_row(make_fake, tmp_path):
    quick = make_fake(models={"quick": 1.0}, loaded=["quick"], tokens=20, token_delay=0.15)  # ~3 s each
    slow = make_fake(models={"slow": 1.0}, loaded=["slow"], tokens=100, token_delay=0.2)  # ~20 s each
    port = free_port()
    # calibration off, as the dashboard saves it: herd's own timing generation on a new node must
    # not run among the test's 50 requests
    with sqlite3.connect(tmp_path / "latency.db") as db:
        db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO settings VALUES ('calibrate', 'false')")
    proc = start(tmp_path, "--port", str(port), "--node", f"q={quick.url}", "--node", f"s={slow.url}",
                 "--parallel", "64", "--drain-timeout", "5", "--threads", "128")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _online(url, 2), timeout=15, what="router up with its nodes")
        bodies = [{"model": model, "prompt": "x", "stream": stream}
                  for model in ("quick", "slow") for stream in (True, False) for _ in range(12)] + \
                 [{"model": "quick", "prompt": "x"}, {"model": "slow", "prompt": "x"}]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(requests.post, url + "/api/generate", json=body, timeout=60) for body in bodies]
            wait_for(lambda: sum(quick.active.values()) + sum(slow.active.values()) == 50, what="50 in flight")
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            during = requests.post(url + "/api/generate", json={"model": "quick", "prompt": "x"}, timeout=10)
            answers = [future.result() for future in futures]
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert during.status_code == 503 and during.headers["Retry-After"] and "shutting down" in during.json()["error"]
    for body, answer in zip(bodies, answers):
        lines = [json.loads(line) for line in answer.text.splitlines() if line.strip()]
        if body["model"] == "quick":  # finished within the drain
            assert answer.status_code == 200 and lines[-1].get("done") is True and "error" not in lines[-1]
        elif body.get("stream") is False:  # cut short: an error answer in Ollama's shape
            assert answer.status_code == 503 and "shutting down" in lines[-1]["error"]
        else:  # cut short mid-stream: the last line is the error chunk
            assert answer.status_code == 200 and "shutting down" in lines[-1]["error"]
    with sqlite3.connect(tmp_path / "latency.db") as db:
        statuses = dict(db.execute("SELECT status, COUNT(*) FROM request_traces GROUP BY status").fetchall())
    assert statuses == {"completed": 25, "incomplete": 13, "failed": 13}  # 50 + the one refused during the drain


def test_kill_9_loses_no_committed_row_and_herd_starts_again_on_the_same_database(make_fake, tmp_path):
    fake = make_fake()
    proc, url = start_with_node(tmp_path, fake)
    try:
        send_generations(url, 20)
        time.sleep(0.5)  # the writer commits in batches as rows arrive
    finally:
        proc.kill()
        proc.communicate(timeout=20)
    with sqlite3.connect(tmp_path / "latency.db") as db:
        assert db.execute("SELECT COUNT(*) FROM request_traces").fetchone()[0] == 20
    again, _ = start_with_node(tmp_path, fake, port=int(url.rsplit(":", 1)[1]))
    try:
        wait_for(lambda: _online(url), timeout=15, what="router up again")
        assert requests.post(url + "/api/generate", json={"model": "llama3.2", "prompt": "x"}).status_code == 200
    finally:
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=20)
    with sqlite3.connect(tmp_path / "latency.db") as db:
        assert db.execute("SELECT COUNT(*) FROM request_traces").fetchone()[0] == 21


# -- the terminal views of a running router -------------------------------------------------

def run_cli(*args):
    from click.testing import CliRunner

    return CliRunner().invoke(herd.main, list(args))


def test_terminal_views_read_a_running_router(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("box", fake.url)])
    for _ in range(3):
        requests.post(router.url + "/api/chat", json={"model": "llama3.2", "messages": [], "stream": False})
    router.traces()
    status = run_cli("status", "--router-url", router.url)
    assert status.exit_code == 0 and "1 of 1 nodes online" in status.output
    assert "box" in status.output and "llama3.2:latest (4096 ctx, 0 running, kept loaded)" in status.output
    models = run_cli("models", "--router-url", router.url)
    assert models.exit_code == 0 and "llama3.2:latest" in models.output and " 3 " in models.output
    health = run_cli("health", "--router-url", router.url)
    assert health.exit_code == 0 and "health 98/100" in health.output and "fix: Run herd-node on box." in health.output
    listed = run_cli("traces", "-n", "2", "--json", "--router-url", router.url)
    assert listed.exit_code == 0 and len(json.loads(listed.output)["traces"]) == 2
    table = run_cli("traces", "--router-url", router.url).output.splitlines()
    assert table[0].split() == ["WHEN", "MODEL", "NODE", "STATUS", "LATENCY", "TTFT", "TOKENS", "APP"] and len(table) == 4


def test_terminal_views_say_what_to_do_when_they_cannot_read(make_router):
    port = free_port()
    gone = run_cli("status", "--router-url", f"http://127.0.0.1:{port}")
    assert gone.exit_code == 1 and "herd is not reachable" in gone.output
    router = make_router(api_key="k")
    locked = run_cli("models", "--router-url", router.url)
    assert locked.exit_code == 1 and "--api-key" in locked.output
    assert run_cli("models", "--router-url", router.url, "--api-key", "k").exit_code == 0


EXPIRIES = [
    # (expires_at as Ollama's /api/ps writes it, seconds from now or None, what herd status shows)
    ("a keep_alive of -1: a date centuries away", "2318-01-01T00:00:00Z", None, ", kept loaded"),
    ("five minutes from now, with Go's nanoseconds", None, 300, ", until {local:%H:%M}"),
    ("two days from now", None, 2 * 86400, ", until {local:%Y-%m-%d %H:%M}"),
    ("already past", "2020-01-01T00:00:00Z", None, ""),
    ("not a time", "soon", None, ""),
]


@pytest.mark.parametrize("what, text, ahead, shown", EXPIRIES, ids=[e[0] for e in EXPIRIES])
def test_expiry_text(what, text, ahead, shown):
    local = None
    if ahead is not None:
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=ahead)
        text = when.strftime("%Y-%m-%dT%H:%M:%S.") + "123456789+00:00"
        local = when.astimezone()
    assert herd.expiry_text(text) == shown.format(local=local)

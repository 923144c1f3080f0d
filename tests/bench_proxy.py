"""Proxy overhead benchmark: the same load sent straight to a fake Ollama and through herd.

    python tests/bench_proxy.py            # about a minute on a 2-core machine
    python tests/bench_proxy.py --quick    # smaller counts, for a smoke run

The fake node and the router each run in their own process (as they would in a home lab), on
loopback. The client runs here. Every line prints direct, through herd, the difference or ratio,
and the target from the router-core issue.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import urllib3

ROOT = Path(__file__).resolve().parent.parent
CHAT = json.dumps({"model": "llama3.2", "stream": False,
                   "messages": [{"role": "user", "content": "hello there"}]}).encode()
STREAM = json.dumps({"model": "llama3.2", "stream": True,
                     "messages": [{"role": "user", "content": "hello there"}]}).encode()
HEADERS = {"Content-Type": "application/json"}


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib3.request("GET", url, timeout=1, retries=False).status == 200:
                return
        except urllib3.exceptions.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def start_fake(port, tokens, token_delay):
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_ollama.py"), "--port", str(port),
                             "--models", "llama3.2", "--loaded", "llama3.2", "--tokens", str(tokens),
                             "--token-delay", str(token_delay)], stdout=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/api/version")
    return proc


def start_router(port, node_url, data_dir):
    proc = subprocess.Popen([sys.executable, str(ROOT / "herd.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--node", f"bench={node_url}", "--no-mdns", "--no-local", "--parallel", "4096",
                             "--data-dir", str(data_dir), "--log-level", "WARNING"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = json.loads(urllib3.request("GET", base + "/fleet/status").data)
        if status["fleet"]["nodes_online"]:
            return proc
        time.sleep(0.05)
    raise RuntimeError("router never saw the node")


def pct(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# -- measurements ----------------------------------------------------------------------------

def latency_c1(base, count):
    pool = urllib3.PoolManager(maxsize=1)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = pool.request("POST", base + "/api/chat", body=CHAT, headers=HEADERS)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status == 200, response.data
    return statistics.median(times[count // 10:])


def throughput(base, concurrency, seconds):
    pool = urllib3.PoolManager(maxsize=concurrency)
    done = [0] * concurrency
    errors = [0]
    stop = time.perf_counter() + seconds

    def worker(index):
        while time.perf_counter() < stop:
            response = pool.request("POST", base + "/api/chat", body=CHAT, headers=HEADERS)
            if response.status == 200:
                done[index] += 1
            else:
                errors[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started), errors[0]


def ttft_c1(base, count):
    pool = urllib3.PoolManager(maxsize=1)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = pool.request("POST", base + "/api/chat", body=STREAM, headers=HEADERS, preload_content=False)
        for chunk in response.read_chunked():
            times.append((time.perf_counter() - started) * 1000)
            break
        response.drain_conn()
        response.release_conn()
    return statistics.median(times[count // 10:])


def many_streams(base, streams, ramp_s, router_pid=None):
    """`streams` concurrent streams started over `ramp_s` seconds; returns first-token times and errors."""
    pool = urllib3.PoolManager(maxsize=streams + 10, timeout=urllib3.Timeout(connect=10, read=60))
    first, errors, complete = [], [], [0]
    lock = threading.Lock()
    peak_rss = [0]

    def one(delay):
        time.sleep(delay)
        started = time.perf_counter()
        try:
            response = pool.request("POST", base + "/api/chat", body=STREAM, headers=HEADERS,
                                    preload_content=False, retries=False)
            got_first, tail = None, b""
            for chunk in response.read_chunked():
                if got_first is None:
                    got_first = (time.perf_counter() - started) * 1000
                tail = chunk
            response.release_conn()
            with lock:
                if response.status == 200 and b'"done": true' in tail.replace(b'"done":true', b'"done": true'):
                    first.append(got_first)
                    complete[0] += 1
                else:
                    errors.append(f"status {response.status}: {tail[-120:]!r}")
        except Exception as exc:  # noqa: BLE001 - a benchmark counts every failure
            with lock:
                errors.append(repr(exc))

    def sample_rss():
        process = psutil.Process(router_pid)
        while any(t.is_alive() for t in threads):
            peak_rss[0] = max(peak_rss[0], process.memory_info().rss)
            time.sleep(0.2)

    threads = [threading.Thread(target=one, args=(ramp_s * i / streams,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    sampler = None
    if router_pid:
        sampler = threading.Thread(target=sample_rss)
        sampler.start()
    for thread in threads:
        thread.join()
    if sampler:
        sampler.join()
    return first, errors, complete[0], peak_rss[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n_c1, seconds, n_ttft, streams = (300, 2, 200, 100) if args.quick else (2000, 6, 1000, 500)

    procs = []
    data_dir = Path(tempfile.mkdtemp(prefix="herd-bench-"))
    try:
        fast_port, slow_port = free_port(), free_port()
        procs.append(start_fake(fast_port, tokens=5, token_delay=0))
        procs.append(start_fake(slow_port, tokens=50, token_delay=0.1))
        fast_direct, slow_direct = f"http://127.0.0.1:{fast_port}", f"http://127.0.0.1:{slow_port}"
        herd_fast_port, herd_slow_port = free_port(), free_port()
        herd_fast = start_router(herd_fast_port, fast_direct, data_dir / "fast")
        herd_slow = start_router(herd_slow_port, slow_direct, data_dir / "slow")
        procs += [herd_fast, herd_slow]
        via_fast, via_slow = f"http://127.0.0.1:{herd_fast_port}", f"http://127.0.0.1:{herd_slow_port}"

        print(f"herd proxy benchmark on {os.cpu_count()} cores, Python {sys.version.split()[0]}")
        print(f"{'measure':44} {'direct':>10} {'herd':>10} {'herd-direct':>12} {'ratio':>7}  target")
        latency_c1(fast_direct, 200), latency_c1(via_fast, 200)  # warm up both paths
        direct = latency_c1(fast_direct, n_c1)
        via = latency_c1(via_fast, n_c1)
        print(f"{'non-streaming c=1, p50 latency (ms)':44} {direct:10.2f} {via:10.2f} {via - direct:+12.2f} "
              f"{via / direct:7.2f}  +<=1.5 ms {'PASS' if via - direct <= 1.5 else 'FAIL'}")

        direct_rps, direct_err = throughput(fast_direct, 16, seconds)
        via_rps, via_err = throughput(via_fast, 16, seconds)
        print(f"{'non-streaming c=16, throughput (req/s)':44} {direct_rps:10.0f} {via_rps:10.0f} "
              f"{via_rps - direct_rps:+12.0f} {via_rps / direct_rps:7.2f}  >=0.25 "
              f"{'PASS' if via_rps / direct_rps >= 0.25 and not via_err else 'FAIL'} (errors {direct_err}/{via_err})")

        direct = ttft_c1(fast_direct, n_ttft)
        via = ttft_c1(via_fast, n_ttft)
        print(f"{'streaming c=1, p50 time to first token (ms)':44} {direct:10.2f} {via:10.2f} {via - direct:+12.2f} "
              f"{via / direct:7.2f}  +<=1.5 ms {'PASS' if via - direct <= 1.5 else 'FAIL'}")

        ramp = streams / 200
        d_first, d_errors, d_done, _ = many_streams(slow_direct, streams, ramp)
        v_first, v_errors, v_done, rss = many_streams(via_slow, streams, ramp, herd_slow.pid)
        d99, v99 = pct(d_first, 99) if d_first else float("nan"), pct(v_first, 99) if v_first else float("nan")
        ok = v_done == streams and not v_errors and v99 - d99 <= 100 and rss < 300 * 1024 ** 2
        print(f"{f'{streams} streams x 50 tok @10 tok/s, TTFT p99 (ms)':44} {d99:10.1f} {v99:10.1f} "
              f"{v99 - d99:+12.1f} {v99 / d99:7.2f}  +<=100 ms {'PASS' if ok else 'FAIL'}")
        print(f"{'  completed / errors':44} {f'{d_done}/{len(d_errors)}':>10} {f'{v_done}/{len(v_errors)}':>10}")
        print(f"{'  router peak RSS (MB)':44} {'':10} {rss / 1024 ** 2:10.0f} {'':12} {'':7}  <300 MB")
        for error in (d_errors + v_errors)[:5]:
            print("  error:", error)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()

"""Proxy overhead benchmark: the same load sent straight to a fake Ollama, through the floor, and
through herd.

    python tests/bench_proxy.py                  # about a minute and a half on a 2-core machine
    python tests/bench_proxy.py --quick          # smaller counts, for a smoke run
    python tests/bench_proxy.py --only c1,ttft   # some measurements only: c1, ttft, c16, streams

Three targets: "direct" (client -> fake Ollama), "floor" (client -> tests/floor_proxy.py, a bare
pass-through on herd's own stack -> fake Ollama) and "herd" (client -> herd -> fake Ollama). The
fake node and each proxy run in their own process on loopback; the client runs here.

The machine's noise should fall on all three alike: at concurrency 1 the targets take turns
request by request; at concurrency 16 a second at a time. Every measurement is repeated for a few
rounds, each starting one target later, and a value is the median of its rounds. Latency rows
print what herd and the floor add to direct and the ratio of the two; throughput rows print
herd's share of direct and of the floor; those ratios are taken within each round. Targets: herd against direct
(the router-core issue) and herd against the floor (what herd costs beyond its stack).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import urllib3

from bench_common import free_port, pct, start_fake, start_herd, start_process, stop, wait_nodes

CHAT = json.dumps({"model": "llama3.2", "stream": False,
                   "messages": [{"role": "user", "content": "hello there"}]}).encode()
STREAM = json.dumps({"model": "llama3.2", "stream": True,
                     "messages": [{"role": "user", "content": "hello there"}]}).encode()
HEADERS = {"Content-Type": "application/json"}
MEASUREMENTS = ("c1", "ttft", "c16", "streams")
ADDED_MS_TARGET = 1.5  # herd's added latency and TTFT at c=1, against direct
OVER_FLOOR_TARGET = 1.1  # herd's added latency and TTFT, as a multiple of the floor's
THROUGHPUT_TARGET = 0.25  # herd's c=16 throughput, as a share of direct
FLOOR_THROUGHPUT_TARGET = 0.9  # herd's c=16 throughput, as a share of the floor's


@dataclass
class Target:
    """Where the client sends: the fake node itself, or a proxy in front of it."""

    name: str
    url: str
    pid: int


# -- measurements ----------------------------------------------------------------------------

def settled_median(times):
    """The median once the first tenth is past (connections and caches warming up)."""
    return statistics.median(times[len(times) // 10:])


def chat_ms(pool, base):
    """One non-streaming chat: milliseconds until the whole reply is in."""
    started = time.perf_counter()
    response = pool.request("POST", base + "/api/chat", body=CHAT, headers=HEADERS)
    assert response.status == 200, response.data
    return (time.perf_counter() - started) * 1000


def first_token_ms(pool, base):
    """One streaming chat: milliseconds until its first chunk."""
    started = time.perf_counter()
    response = pool.request("POST", base + "/api/chat", body=STREAM, headers=HEADERS, preload_content=False)
    chunks = response.read_chunked()
    next(chunks)
    elapsed = (time.perf_counter() - started) * 1000
    for _ in chunks:  # the rest, as a client reads a stream: the connection then serves the next one
        pass
    response.release_conn()
    return elapsed


def one_at_a_time(send, targets, count):
    """`count` requests to each target, one at a time, the targets taking turns request by request
    so that a moment of the machine's noise falls on all alike; {target name: settled median ms}."""
    pools = {target.name: urllib3.PoolManager(maxsize=1) for target in targets}
    times = {target.name: [] for target in targets}
    for _ in range(count):
        for target in targets:
            times[target.name].append(send(pools[target.name], target.url))
    return {name: settled_median(values) for name, values in times.items()}


def throughput(pool, base, concurrency, seconds):
    """(replies, errors, seconds taken) with `concurrency` clients sending back to back for `seconds`."""
    done = [0] * concurrency
    errors = [0]
    stop_at = time.perf_counter() + seconds

    def worker(index):
        while time.perf_counter() < stop_at:
            try:
                ok = pool.request("POST", base + "/api/chat", body=CHAT, headers=HEADERS).status == 200
            except urllib3.exceptions.HTTPError:
                ok = False
            if ok:
                done[index] += 1
            else:
                errors[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done), errors[0], time.perf_counter() - started


def throughput_in_turns(targets, seconds, turns=3):
    """(requests/s, errors) of each target at concurrency 16 over `seconds`, the targets taking
    turns `turns` times so that the machine's noise falls on all alike. Each target keeps its
    client connections from turn to turn."""
    pools = {target.name: urllib3.PoolManager(maxsize=16) for target in targets}
    totals = {target.name: (0, 0, 0.0) for target in targets}
    for _ in range(turns):
        for target in targets:
            result = throughput(pools[target.name], target.url, 16, seconds / turns)
            totals[target.name] = tuple(total + part for total, part in zip(totals[target.name], result))
    return {name: (replies / elapsed, errors) for name, (replies, errors, elapsed) in totals.items()}


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


def in_rounds(measure, targets, rounds):
    """measure(targets) `rounds` times, each round starting one target later; returns
    {target name: [value per round]}."""
    values = {target.name: [] for target in targets}
    for round_index in range(rounds):
        shift = round_index % len(targets)
        for name, value in measure(targets[shift:] + targets[:shift]).items():
            values[name].append(value)
    return values


# -- the three targets -----------------------------------------------------------------------

def start_targets(procs, data_dir, name, tokens, token_delay):
    """A fake node, and the floor and herd in front of it, each in its own process: [Target]."""
    fake_port, floor_port, herd_port = free_port(), free_port(), free_port()
    node_url = f"http://127.0.0.1:{fake_port}"
    procs.append(start_fake(fake_port, tokens=tokens, token_delay=token_delay))
    direct = Target("direct", node_url, procs[-1].pid)
    procs.append(start_process("tests/floor_proxy.py", "--port", floor_port, "--node", node_url,
                               "--data-dir", data_dir / f"floor-{name}", ready_url=f"http://127.0.0.1:{floor_port}/"))
    floor = Target("floor", f"http://127.0.0.1:{floor_port}", procs[-1].pid)
    procs.append(start_herd(herd_port, data_dir / f"herd-{name}", [("bench", node_url)], flags=["--parallel", 4096]))
    herd = Target("herd", f"http://127.0.0.1:{herd_port}", procs[-1].pid)
    wait_nodes(herd.url, 1, calibrated=True)  # herd's timing run on a new node is over before measuring
    return [direct, floor, herd]


# -- report ----------------------------------------------------------------------------------

def verdict(ok):
    return "PASS" if ok else "FAIL"


def print_rounds(values, digits):
    print(f"{'':4}rounds: " + "  ".join(f"{name} " + " ".join(f"{v:.{digits}f}" for v in rounds)
                                        for name, rounds in values.items()))


def print_latency(label, values):
    """Medians of the rounds: each target, what herd and the floor add to direct, their ratio
    (within each round, where the noise fell alike), and the targets."""
    direct, floor, herd = (statistics.median(values[name]) for name in ("direct", "floor", "herd"))
    rounds = list(zip(values["direct"], values["floor"], values["herd"]))
    herd_added = statistics.median(h - d for d, _, h in rounds)
    floor_added = statistics.median(f - d for d, f, _ in rounds)
    ratio = statistics.median((h - d) / (f - d) if f > d else float("inf") for d, f, h in rounds)
    print(f"  {label:34} {direct:8.2f} {floor:8.2f} {herd:8.2f} {herd_added:+8.2f} {floor_added:+8.2f} "
          f"{ratio:13.2f}  herd+ <= {ADDED_MS_TARGET} ms {verdict(herd_added <= ADDED_MS_TARGET)}, "
          f"herd+/floor+ <= {OVER_FLOOR_TARGET} {verdict(ratio <= OVER_FLOOR_TARGET)}")
    print_rounds(values, 2)


def print_throughput(label, values):
    """Medians of the rounds: each target, herd's share of direct and of the floor (within each
    round), and the targets."""
    rps = {name: [value for value, _ in rounds] for name, rounds in values.items()}
    direct, floor, herd = (statistics.median(rps[name]) for name in ("direct", "floor", "herd"))
    of_direct = statistics.median(h / d for d, h in zip(rps["direct"], rps["herd"]))
    of_floor = statistics.median(h / f for f, h in zip(rps["floor"], rps["herd"]))
    errors = {name: sum(errors for _, errors in rounds) for name, rounds in values.items()}
    ok = not errors["herd"]
    print(f"  {label:34} {direct:8.0f} {floor:8.0f} {herd:8.0f} {of_direct:11.2f} {of_floor:10.2f}  "
          f"herd/direct >= {THROUGHPUT_TARGET} {verdict(ok and of_direct >= THROUGHPUT_TARGET)}, "
          f"herd/floor >= {FLOOR_THROUGHPUT_TARGET} {verdict(ok and of_floor >= FLOOR_THROUGHPUT_TARGET)} "
          f"(errors {errors['direct']}/{errors['floor']}/{errors['herd']})")
    print_rounds(rps, 0)


def print_streams(targets, streams):
    """Many concurrent slow streams, once per target: TTFT p99, completions, proxies' peak RSS."""
    ramp = streams / 200
    results = {t.name: many_streams(t.url, streams, ramp, t.pid if t.name != "direct" else None) for t in targets}
    p99 = {name: pct(first, 99) if first else float("nan") for name, (first, *_rest) in results.items()}
    _, herd_errors, herd_done, herd_rss = results["herd"]
    herd_added, floor_added = p99["herd"] - p99["direct"], p99["floor"] - p99["direct"]
    ok = herd_done == streams and not herd_errors and herd_added <= 100 and herd_rss < 300 * 1024 ** 2
    print(f"{f'{streams} streams x 50 tok @10 tok/s':36} {'direct':>8} {'floor':>8} {'herd':>8} {'herd+':>8} "
          f"{'floor+':>8}")
    print(f"  {'TTFT p99 (ms)':34} {p99['direct']:8.1f} {p99['floor']:8.1f} {p99['herd']:8.1f} {herd_added:+8.1f} "
          f"{floor_added:+8.1f}  herd+ <= 100 ms, all complete, RSS < 300 MB {verdict(ok)}")
    print(f"  {'completed / errors':34} " + " ".join(f"{f'{done}/{len(errors)}':>8}"
                                                     for _, errors, done, _ in results.values()))
    print(f"  {'peak RSS (MB)':34} {'':8} " + " ".join(f"{results[name][3] / 1024 ** 2:8.0f}"
                                                       for name in ("floor", "herd")))
    for name, (_, errors, _, _) in results.items():
        for error in errors[:5]:
            print(f"  {name} error:", error)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    parser.add_argument("--only", default=",".join(MEASUREMENTS),
                        help=f"comma-separated measurements to run, of {','.join(MEASUREMENTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each measurement; the median is reported")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if not only <= set(MEASUREMENTS):
        parser.error(f"--only takes {','.join(MEASUREMENTS)}, not {','.join(sorted(only - set(MEASUREMENTS)))}")
    n_c1, seconds, n_ttft, streams = (100, 1, 100, 100) if args.quick else (700, 3, 400, 500)

    procs = []
    data_dir = Path(tempfile.mkdtemp(prefix="herd-bench-"))
    try:
        fast = start_targets(procs, data_dir, "fast", tokens=5, token_delay=0)
        print(f"herd proxy benchmark on {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
              f"each value the median of {args.rounds} rounds of direct, floor and herd in turn")
        one_at_a_time(chat_ms, fast, 200)  # warm up every path
        if only & {"c1", "ttft"}:
            print(f"{'latency at c=1 (ms)':36} {'direct':>8} {'floor':>8} {'herd':>8} {'herd+':>8} {'floor+':>8} "
                  f"{'herd+/floor+':>13}  targets")
        if "c1" in only:
            print_latency("non-streaming, p50 latency",
                          in_rounds(lambda targets: one_at_a_time(chat_ms, targets, n_c1), fast, args.rounds))
        if "ttft" in only:
            print_latency("streaming, p50 time to first token",
                          in_rounds(lambda targets: one_at_a_time(first_token_ms, targets, n_ttft), fast, args.rounds))
        if "c16" in only:
            print(f"{'throughput at c=16 (req/s)':36} {'direct':>8} {'floor':>8} {'herd':>8} {'herd/direct':>11} "
                  f"{'herd/floor':>10}  targets")
            print_throughput("non-streaming",
                             in_rounds(lambda targets: throughput_in_turns(targets, seconds), fast, args.rounds))
        if "streams" in only:
            print_streams(start_targets(procs, data_dir, "slow", tokens=50, token_delay=0.1), streams)
    finally:
        stop(procs)


if __name__ == "__main__":
    main()

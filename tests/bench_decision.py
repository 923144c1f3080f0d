"""How long one routing decision takes as the fleet gets busy.

    python tests/bench_decision.py

Builds fleets of 4 and 16 nodes in memory (herd.Node, no servers), puts 1, 100 and 1,000
requests running on them (three models, spread over the nodes, 1,024 parallel slots per model;
each request a conversation of its own behind one shared system prompt, in the slot the runner
would give it, with as many finished conversations in slots beside them), and times
herd.choose, the scoring herd runs under the fleet's lock for every request, for the next turn
of a finished conversation, which every node could serve. A decision should not grow with the
requests in flight: herd keeps each node's running requests per model as sums and sorted end
times, and looks only at the free slots that hold a prompt.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import herd  # noqa: E402

GB = herd.GB
MODELS = {"llama3.2:latest": 2.0, "qwen2.5:7b": 4.7, "llama3.1:8b": 4.9}
DECISIONS = 3000
ROUNDS = 15  # the decisions of each fleet are timed in this many turns, interleaved
SYSTEM = "You are a helpful assistant. " * 150  # about 4,000 characters, shared by every conversation


def conversation(index, *turns):
    """The body of conversation `index` after `turns` (user, assistant, user, ...)."""
    roles = ("user", "assistant")
    return {"messages": [{"role": "system", "content": SYSTEM}] +
            [{"role": roles[i % 2], "content": f"conversation {index}: {text}"} for i, text in enumerate(turns)]}


def fleet(nodes, running):
    """`nodes` nodes with every model installed and loaded, `running` requests spread over them."""
    now = time.monotonic()
    built = []
    for index in range(nodes):
        node = herd.Node(node_id=f"n{index}", url=f"http://127.0.0.1:{20000 + index}", source="agent",
                         interval_s=5, last_seen=time.time(), reachable=True, num_parallel=1024,
                         memory_budget_gb=64, decode_speed=300.0 + 50 * index, prefill_speed=6000.0,
                         load_cost=(1.0, 0.5))
        node.models = {name: {"name": name, "size": int(gb * GB)} for name, gb in MODELS.items()}
        node.loaded = {name: {"name": name, "size": int(gb * GB), "size_vram": int(gb * GB), "context_length": 4096}
                       for name, gb in MODELS.items()}
        built.append(node)
    names = list(MODELS)
    taken = []
    for index in range(2 * running):  # all at once; then the first half finish, the second half run on
        node, model = built[index % nodes], names[index % len(names)]
        slot, _ = node.take_slot(model, herd.prompt_prefix(conversation(index, "a question"), "/api/chat"), 1024)
        taken.append((node, model, slot))
    for index, (node, model, slot) in enumerate(taken):
        if index < running:
            slot.used = now - index % 30
            node.prompts[model].give_back(slot)
        else:
            node.hold(herd.Lease(node_id=node.node_id, url=node.url, model=model, score=0, breakdown={},
                                 eta_s=1.0 + index % 17, started=now - index % 5))
    return built


def decision_timer(nodes):
    """A function that times `n` decisions on `nodes` and adds them, in seconds, to a list."""
    body = dict(conversation(0, "a question", "an answer", "the next question"), model="llama3.2")
    call = herd.Call(api="ollama", endpoint="/api/chat", body=body, raw=b"", model="llama3.2:latest",
                     stream=True, fallback_models=[], tags=[], client_ip="127.0.0.1", request_id="bench",
                     started=time.perf_counter(), prompt_chars=sum(len(m["content"]) for m in body["messages"]),
                     prefix=herd.prompt_prefix(body, "/api/chat"))
    follow_ups = herd.FollowUps()

    def time_some(n, times):
        for _ in range(n):
            started = time.perf_counter()
            herd.choose(nodes, call, ["llama3.2:latest"], parallel=1, policy="strip", usual_output={}, queued={},
                        follow_ups=follow_ups)
            times.append(time.perf_counter() - started)
    return time_some


def main():
    print(f"one decision (herd.choose), median of {DECISIONS}, microseconds")
    print(f"{'nodes':>6} {'1 running':>10} {'100 running':>12} {'1,000 running':>14} {'1,000 / 1':>10}")
    for nodes in (4, 16):
        timers = [decision_timer(fleet(nodes, running)) for running in (1, 100, 1000)]
        times = [[] for _ in timers]
        for _ in range(ROUNDS):  # in turns, so that the machine's drift falls on all three alike
            for timer, kept in zip(timers, times):
                timer(DECISIONS // ROUNDS, kept)
        micros = [statistics.median(kept) * 1e6 for kept in times]
        print(f"{nodes:>6} {micros[0]:>10.1f} {micros[1]:>12.1f} {micros[2]:>14.1f} {micros[2] / micros[0]:>10.2f}")


if __name__ == "__main__":
    main()

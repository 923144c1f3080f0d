"""Scoring and context rules as pure functions: plain nodes and calls in, numbers out.

Every expected value is worked out by hand in the row's comment from the formulas in herd.py's
Scoring section (priors: 300 GB/s decode, prefill 20x decode, loads 1 s + 0.5 s/GB; 4 characters
a token; 250 output tokens unless measured).
"""

import random
import time

import pytest

import herd

GB = herd.GB
NOW = 1000.0  # time.monotonic() as the functions are told it


def make_node(models=None, loaded=(), ctx=4096, budget_gb=None, **fields):
    """A node with `models` {name: GB} installed and `loaded` hot at `ctx`."""
    models = models or {"m:latest": 4.0}
    node = herd.Node(node_id="n", url="http://127.0.0.1:1", source="agent", interval_s=5,
                     last_seen=time.time(), reachable=True, memory_budget_gb=budget_gb)
    node.models = {name: {"name": name, "size": int(gb * GB)} for name, gb in models.items()}
    node.loaded = {name: {"name": name, "size": int(models[name] * GB), "size_vram": int(models[name] * GB),
                          "context_length": ctx} for name in loaded}
    for key, value in fields.items():
        setattr(node, key, value)
    return node


def make_call(body=None, api="ollama", endpoint="/api/chat", prompt_chars=400):
    body = body if body is not None else {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    return herd.Call(api=api, endpoint=endpoint, body=body, raw=b"", model="m:latest", stream=False,
                     fallback_models=[], tags=[], client_ip="127.0.0.1", request_id="t-1",
                     started=time.perf_counter(), prompt_chars=prompt_chars)


def run(node, model, started, eta):
    """Put a running request of `eta` seconds, started at `started`, on the node."""
    node.hold(herd.Lease(node_id=node.node_id, url=node.url, model=model, score=0, breakdown={},
                         eta_s=eta, started=started))


def estimate(node, call=None, slots=1, ahead=0, usual=250, policy="strip", priors=herd.Priors(), follow_ups=None):
    return herd.estimate(node, "m:latest", call or make_call(), slots=slots, policy=policy, usual_output=usual,
                         ahead=ahead, priors=priors, admit=True, now=NOW, follow_ups=follow_ups)


# work on an unmeasured node for a 4 GB model, 100 prompt tokens, 250 output tokens:
# 100 x 4 / 6000 + 250 x 4 / 300 = 0.0667 + 3.3333 = 3.4 s
WORK = 3.4


def with_x_running(remaining):
    node = make_node({"m:latest": 4.0, "x:latest": 8.0}, loaded=["m:latest", "x:latest"])
    run(node, "x:latest", NOW, remaining)
    return node


def recently_unloaded():
    node = make_node()
    node.unloaded_at["m:latest"] = NOW - 60
    return node


def busy():
    node = make_node(loaded=["m:latest"])
    run(node, "m:latest", NOW, 2.0)
    return node


def beside_busy_split(drain):
    """m hot at 4096 (its one request `drain` s from its end, or none) beside a 20 GB model that
    /api/ps shows half in system RAM, with a request 10 s from its end."""
    node = make_node({"m:latest": 4.0, "big:latest": 20.0}, loaded=["m:latest", "big:latest"],
                     decode_speed=300.0, prefill_speed=6000.0)  # measured as the priors are
    node.loaded["big:latest"]["size_vram"] = int(10 * GB)
    run(node, "big:latest", NOW, 10.0)
    if drain:
        run(node, "m:latest", NOW, drain)
    return node


def with_traffic(times):
    """A node with m hot at 4096 whose requests for it started at `times`."""
    node = make_node(loaded=["m:latest"])
    node.started["m:latest"] = list(times)
    return node


ESTIMATES = [
    # (what, node, call, ahead, expected {cause: seconds})
    ("hot, idle, unmeasured: service only", make_node(loaded=["m:latest"]), None, 0,
     {"wait": 0, "cold_load": 0, "service": WORK, "slowdown": 0, "eta": WORK}),
    ("cold: 1 s + 4 GB x 0.5 s/GB = 3 s load first", make_node(), None, 0,
     {"cold_load": 3.0, "eviction": 0, "eta": 3.0 + WORK}),
    ("unloaded a minute ago: half the load from the page cache", recently_unloaded(), None, 0,
     {"cold_load": 1.5, "eta": 1.5 + WORK}),
    ("cold on an 8 GB node holding a 6 GB model: evicts it, 0.5 x (1 + 6 x 0.5) = 2 s",
     make_node({"m:latest": 4.0, "big:latest": 6.0}, loaded=["big:latest"], budget_gb=8), None, 0,
     {"cold_load": 3.0, "eviction": 2.0}),
    ("measured 600 GB/s decode, 12000 prefill: 100 x 4 / 12000 + 250 x 4 / 600 = 1.7 s",
     make_node(loaded=["m:latest"], decode_speed=600.0, prefill_speed=12000.0), None, 0,
     {"service": 1.7, "eta": 1.7}),
    ("num_ctx 8192 over a loaded 4096: reload, 0 s drain + 3 s", make_node(loaded=["m:latest"]),
     make_call({"model": "m", "options": {"num_ctx": 8192}}), 0, {"reload": 3.0, "cold_load": 3.0, "eta": 3.0 + WORK}),
    # the reload keeps the model's next requests there waiting: as many as arrive in those 3 s,
    # each 1.5 s on average
    ("the same with 12 requests started there in the last minute: 12 / 60 x 3 x 3 / 2 = 0.9 s for them",
     with_traffic(NOW - 5 * i for i in range(12)), make_call({"model": "m", "options": {"num_ctx": 8192}}), 0,
     {"reload": 3.0, "eviction": 0.9, "eta": 3.0 + WORK}),
    ("a request 61 s ago is out of the window: 11 / 60 x 4.5 = 0.825 s",
     with_traffic([NOW - 61] + [NOW - 5 * i for i in range(11)]), make_call({"model": "m", "options": {"num_ctx": 8192}}),
     0, {"eviction": 0.825}),
    ("the 32 kept all in the last 15.5 s: 32 / 15.5 x 4.5 = 9.29 s",
     with_traffic(NOW - 0.5 * i for i in range(31, -1, -1)), make_call({"model": "m", "options": {"num_ctx": 8192}}),
     0, {"eviction": 9.2903}),
    # big fills the VRAM: the reload waits 10 s for it to finish, then pushes it out
    ("reload beside a busy split model: 10 s wait, 3 s reload, its 10 GB of VRAM 0.5 x (1 + 10 x 0.5) = 3 s",
     beside_busy_split(0), make_call({"model": "m", "options": {"num_ctx": 8192}}), 0,
     {"wait": 10.0, "reload": 3.0, "eviction": 3.0, "service": WORK, "eta": 13.0 + WORK}),
    # m drains for 4 s while big finishes: the 10 s wait covers the drain
    ("the same while m drains 4 s: the drain overlaps the wait", beside_busy_split(4.0),
     make_call({"model": "m", "options": {"num_ctx": 8192}}), 0, {"wait": 10.0, "reload": 3.0}),
    ("no reload beside a busy split model: shares with it, 6.8 s, as beside any other",
     beside_busy_split(0), None, 0, {"wait": 0, "reload": 0, "eviction": 0, "service": 6.8}),
    ("traffic, but no reload: nothing for it", with_traffic(NOW - 5 * i for i in range(12)), None, 0, {"eviction": 0}),
    ("num_ctx 2048 under a loaded 4096: stripped, no reload", make_node(loaded=["m:latest"]),
     make_call({"model": "m", "options": {"num_ctx": 2048}}), 0, {"reload": 0, "eta": WORK}),
    ("/v1 to a model loaded at 8192 where the default is 4096: reload", make_node(loaded=["m:latest"], ctx=8192,
     default_context_length=4096), make_call({"model": "m"}, api="openai", endpoint="/v1/chat/completions"), 0,
     {"reload": 3.0}),
    ("max_tokens 50 caps the output: 0.0667 + 50 x 4 / 300 = 0.7333 s", make_node(loaded=["m:latest"]),
     make_call({"model": "m", "max_tokens": 50}), 0, {"service": 0.7333}),
    ("embedding: no output tokens, 100 x 4 / 6000 = 0.0667 s", make_node(loaded=["m:latest"]),
     make_call({"model": "m", "input": "x"}, endpoint="/api/embed"), 0, {"service": 0.0667}),
    ("two failures: risk 2 x 25% of the time", make_node(loaded=["m:latest"], failures=2), None, 0,
     {"risk": 0.5 * WORK}),
    ("the one slot is busy for 2 s: wait 2 s, then run", busy(), None, 0, {"wait": 2.0, "eta": 2.0 + WORK}),
    ("busy for 2 s with one request queued ahead: 2 s + 1 x 2 s per slot", busy(), None, 1, {"wait": 4.0}),
    # beside x (1 stream, 10 s left), both run at half speed: 3.4 x 2 = 6.8 s; x loses half of
    # those 6.8 s: 3.4 s; waiting 10 s then 3.4 s alone is later: share
    ("beside another model with 10 s left: 6.8 s, x slowed 3.4 s", with_x_running(10.0), None, 0,
     {"service": 6.8, "slowdown": 3.4, "wait": 0, "defer": False}),
    # x has 1 s left: sharing, x stretches to 2 s while this one does 1 s of work, then 2.4 s alone:
    # 4.4 s, and x loses 1 s. Waiting 1 s, then 3.4 s alone, ends at 4.4 < 4.4 + 1: defer
    ("beside another model with 1 s left: waits for it instead", with_x_running(1.0), None, 0,
     {"wait": 1.0, "service": WORK, "slowdown": 0, "eta": 1.0 + WORK, "defer": True}),
]


@pytest.mark.parametrize("what, node, call, ahead, expected", ESTIMATES, ids=[row[0] for row in ESTIMATES])
def test_estimate(what, node, call, ahead, expected):
    got = estimate(node, call, ahead=ahead)
    for cause, seconds in expected.items():
        assert got[cause] == pytest.approx(seconds, abs=1e-3), (cause, got)



def test_a_model_loaded_at_a_guessed_default_follows_the_guess_when_it_changes():
    # herd loaded m without num_ctx when it took the default for 4096; then the node shows another
    # model at 32768, so the default is taken to be 32768: m runs at it too, and a plain request
    # is sent as it is (num_ctx 4096 would reload m down to it)
    node = make_node({"m:latest": 4.0, "x:latest": 2.0})
    node.note_switch("m:latest", 4096, {"num_ctx": None}, 1.0, at_default=True)
    assert node.running_context("m:latest") == 4096
    node.loaded["x:latest"] = {"name": "x:latest", "size": int(2 * GB), "context_length": 32768}
    node.guessed_ctx = None
    assert node.context_default("m:latest") == node.running_context("m:latest") == 32768
    call = make_call()
    lease, _ = herd.choose([node], call, ["m:latest"], parallel=1, policy="strip", usual_output={}, queued={})
    assert lease.loaded_ctx == lease.default_ctx == 32768
    herd.protect_context(call, lease, "strip")
    assert "options" not in call.body and not call.events

def test_shared_run_integrates_over_the_other_model_ending():
    # x (1 stream, 1 s left) and this request (3.4 s of work) share: each at half pace. x's 1 s
    # stretches to 2 s, during which this one does 1 s of work; the other 2.4 s run alone:
    # 2 + 2.4 = 4.4 s, and x was slowed for 2 s x (1 - 1/2) = 1 s.
    node = with_x_running(1.0)
    assert herd.shared_run(node, "m:latest", WORK, 0.0, NOW) == pytest.approx((4.4, 1.0))


def split_node(vram_share=None, own=(), decode_speed=300.0, ram_speed=None):
    """A node (measured at `decode_speed` GB/s, its system RAM at `ram_speed`) with m hot,
    `vram_share` of it in VRAM, and `own` decode samples of m."""
    node = make_node(loaded=["m:latest"], decode_speed=decode_speed)
    node.ram_speed = ram_speed
    if vram_share is not None:
        node.loaded["m:latest"]["size_vram"] = int(vram_share * 4 * GB)
    for gbs in own:
        node.model_gbs.setdefault("m:latest", herd.Recent()).add(gbs)
    return node


MODEL_SPEEDS = [
    # (what, node, expected decode GB/s for m)
    ("in VRAM: the node's speed", split_node(1.0), 300.0),
    ("95% in VRAM counts as in VRAM", split_node(0.95), 300.0),
    # half the weights at 300 GB/s, half at the RAM prior of a tenth of that, 30:
    # 1 / (0.5/300 + 0.5/30) = 1 / (1/600 + 1/60) = 600/11
    ("half in system RAM: the two paces in turn", split_node(0.5), 600 / 11),
    # the same with RAM measured at 60 GB/s: 1 / (0.5/300 + 0.5/60) = 100
    ("half in system RAM, its speed learnt", split_node(0.5, ram_speed=60.0), 100.0),
    ("all in RAM on a CPU machine: the node's speed is a CPU speed", split_node(0.0), 300.0),
    ("one sample of its own is not enough", split_node(1.0, own=(90.0,)), 300.0),
    ("two of its own: their lower quartile", split_node(1.0, own=(120.0, 90.0)), 90.0),
    ("unmeasured node: the prior", split_node(1.0, decode_speed=None), 300.0),
]


@pytest.mark.parametrize("what, node, expected", MODEL_SPEEDS, ids=[r[0] for r in MODEL_SPEEDS])
def test_model_speed(what, node, expected):
    assert herd.model_speed(node, "m:latest", herd.Priors()) == pytest.approx(expected)


def test_a_split_model_teaches_its_own_speed_and_not_the_nodes():
    node = split_node(0.5, decode_speed=None)
    timings = {"eval_count": 100, "eval_s": 10.0}  # 10 tokens/s x 4 GB = 40 GB/s
    for _ in range(3):
        herd.record_speeds(node, "m:latest", 4.0, timings, shared=1.0, alone=True)
    assert node.decode_speed is None and len(node.decode_gbs) == 0
    assert herd.model_speed(node, "m:latest", herd.Priors()) == pytest.approx(40.0)
    node.loaded["m:latest"]["size_vram"] = 4 * GB  # all in VRAM now: the node learns from it
    herd.record_speeds(node, "m:latest", 4.0, timings, shared=1.0, alone=True)
    assert node.decode_speed == pytest.approx(40.0)


RAM_SAMPLES = [
    # (what, VRAM share, the split model's measured GB/s, RAM speed learnt); the node's VRAM at 300
    # per GB 1/400 s, of which 0.5/300 in VRAM: RAM took 1/400 - 1/600 = 1/1200 s for 0.5 GB,
    # 600 GB/s: faster than the VRAM, so the VRAM's 300
    ("never faster than the VRAM", 0.5, 400.0, 300.0),
    # per GB 1/262 s, 0.89/300 in VRAM: RAM's 0.11 GB took 0.000850 s, a quarter of 1/262 is
    # 0.000954: too small a part to tell from the error in the node's speed, no sample
    ("RAM a small part of the time: no sample", 0.89, 262.0, None),
    ("the worked case above", 0.5, 100.0, 60.0),
]


@pytest.mark.parametrize("what, share, gbs, expected", RAM_SAMPLES, ids=[r[0] for r in RAM_SAMPLES])
def test_ram_speed_samples(what, share, gbs, expected):
    node = split_node(share)
    herd.learn_ram_speed(node, share, gbs)
    assert node.ram_speed == (pytest.approx(expected) if expected else None)


def test_another_load_under_way_holds_a_load_up():
    node = make_node({"m:latest": 2.0, "o:latest": 2.0}, decode_speed=300.0)
    now = time.monotonic()
    assert not node.loading_other("m:latest", now)
    other = herd.Lease(node_id="n", url=node.url, model="o:latest", score=0, breakdown={}, cold=True)
    node.hold(other)  # a request herd sent that loads o, not answered yet
    assert node.loading_other("m:latest", now) and not node.loading_other("o:latest", now)
    other.answered = True
    assert not node.loading_other("m:latest", now)
    node.preloading = "o:latest"  # the warmer loading o
    assert node.loading_other("m:latest", now)


def reload_fleet():
    """A fleet with node a (2 slots) running m at 4096, and a request for m holding one slot."""
    fleet = herd.Fleet(herd.Config())
    entry = {"name": "m:latest", "model": "m:latest", "size": 2 * GB}
    fleet.report("a", "http://127.0.0.1:1", "agent", 3600.0,
                 {"num_parallel": 2, "ollama": {"reachable": True, "models": [entry],
                                                "loaded": [dict(entry, size_vram=2 * GB, context_length=4096)]}})
    fleet.nodes["a"].decode_speed = 300.0
    return fleet, fleet.acquire(make_call())


LARGER = {"model": "m", "messages": [{"role": "user", "content": "x"}], "options": {"num_ctx": 8192}}
SERVED = {"eval_count": 100, "eval_s": 1.0}


def test_a_reload_that_drained_its_models_requests_learns_the_reload_without_the_drain():
    # Ollama's load_duration for a context reload includes the wait for the model's running
    # requests to end; herd saw when they did, and learns the rest
    fleet, running = reload_fleet()
    lease = fleet.acquire(make_call(LARGER))
    assert lease.reload and lease.drain == (running,)
    lease.started -= 4.0  # sent 4 s ago; the running request ends now
    fleet.release(running, served=False)
    fleet.release(lease, served=True, timings=dict(SERVED, load_s=6.5))  # 4 s of drain, 2.5 s of reload
    (gb, seconds), = fleet.nodes["a"].loads
    assert gb == 2.0 and seconds == pytest.approx(2.5, abs=0.05)


def test_a_reload_learns_from_when_the_last_of_its_own_drained_requests_ended():
    # two requests drain; one sent after the reload ends early (its client left); the later of
    # the two drained ones ends 3 s after the reload was sent
    fleet, first = reload_fleet()
    fleet.nodes["a"].num_parallel = 4
    second = fleet.acquire(make_call())
    lease = fleet.acquire(make_call(LARGER))
    assert set(lease.drain) == {first, second}
    lease.started -= 5.0
    later = fleet.acquire(make_call(LARGER))
    fleet.release(later, served=False)  # ends now, 5 s after: not one of the drained, it says nothing of the drain
    fleet.release(first, served=False)
    fleet.release(second, served=False)
    first.ended, second.ended = lease.started + 2.0, lease.started + 3.0
    fleet.release(lease, served=True, timings=dict(SERVED, load_s=6.5))  # 3 s of drain, 3.5 s of reload
    (gb, seconds), = fleet.nodes["a"].loads
    assert seconds == pytest.approx(3.5, abs=0.05)


def test_a_reload_whose_drain_herd_did_not_see_end_is_not_learnt_from():
    fleet, running = reload_fleet()
    lease = fleet.acquire(make_call(LARGER))
    fleet.release(lease, served=True, timings=dict(SERVED, load_s=6.5))  # `running` still runs, as herd sees it
    assert fleet.nodes["a"].loads == []
    fleet.release(running, served=False)
    lease = fleet.acquire(make_call(dict(LARGER, options={"num_ctx": 16384})))  # nothing running there now
    assert lease.reload and lease.drain == ()
    fleet.release(lease, served=True, timings=dict(SERVED, load_s=3.0))
    assert fleet.nodes["a"].loads == [(2.0, 3.0)]


def test_a_split_model_teaches_the_nodes_ram_speed():
    node = split_node(0.5)  # VRAM at 300 GB/s
    # 25 tokens/s x 4 GB = 100 GB/s; per GB 1/100 s, of which 0.5/300 in VRAM: the RAM's half took
    # 1/100 - 1/600 = 1/120 s, so RAM streams 0.5 GB in 1/120 s: 60 GB/s
    herd.record_speeds(node, "m:latest", 4.0, {"eval_count": 100, "eval_s": 4.0}, shared=1.0, alone=True)
    assert node.ram_speed == pytest.approx(60.0)
    assert node.decode_speed == 300.0  # the node's own speed is not taught by a split model
    other = split_node(0.25)
    other.ram_speed = node.ram_speed  # another model split there: 1 / (0.25/300 + 0.75/60) = 75
    assert herd.model_speed(other, "m:latest", herd.Priors()) == pytest.approx(75.0)


def node_holding(budget_gb, split=()):
    node = make_node({"a:latest": 2.0, "b:latest": 3.0, "c:latest": 4.0, "new:latest": 4.0},
                     loaded=["c:latest", "a:latest", "b:latest"], budget_gb=budget_gb)
    for name in split:
        if name in node.loaded:
            node.loaded[name]["size_vram"] //= 2
        else:
            node.split_share[name] = 0.5
    return node


PUSHED_OUT = [
    # (what, node, GB to load, models pushed out)
    ("9 of 10 GB used, 4 to load: the smallest until 4 are free", node_holding(10), 4, ["a:latest", "b:latest"]),
    ("1 GB to load into 1 GB free: none", node_holding(10), 1, []),
    ("no budget, all in VRAM: none", node_holding(None), 4, []),
    ("no budget, one split with RAM: that one (it fills the VRAM)", node_holding(None, ["b:latest"]), 4, ["b:latest"]),
    ("a model seen split here before loads alone: all of them", node_holding(None, ["new:latest"]), 4,
     ["a:latest", "b:latest", "c:latest"]),
]


@pytest.mark.parametrize("what, node, gb, expected", PUSHED_OUT, ids=[r[0] for r in PUSHED_OUT])
def test_pushed_out(what, node, gb, expected):
    node.models["new:latest"]["size"] = int(gb * GB)
    assert herd.pushed_out(node, "new:latest") == expected


def test_a_reload_counts_the_memory_its_own_model_frees():
    # 9 GB of a 9 GB budget in use; reloading c (4 GB) frees its own 4 GB first: nothing else goes
    node = node_holding(9)
    assert herd.pushed_out(node, "c:latest") == []


def test_unmeasured_priors_decode_like_the_slowest_node_and_load_like_the_median_one():
    fast = make_node(decode_speed=900.0, load_cost=(0.5, 0.2))
    middle = make_node(decode_speed=400.0, load_cost=(0.8, 0.25))
    slow = make_node(decode_speed=200.0, load_cost=(1.5, 1.0))  # a spinning disk
    fresh = make_node()
    assert herd.unmeasured_priors([fast, middle, slow, fresh]) == herd.Priors(200.0, 0.8, 0.25)
    assert herd.unmeasured_priors([fast, slow]) == herd.Priors(200.0, 1.0, 0.6)  # median of two: the mean
    assert herd.unmeasured_priors([fresh]) == herd.Priors(300.0, 1.0, 0.5)


def test_score_candidates_prices_every_signal_at_one_rate():
    a, b = make_node(), make_node()
    estimates = [(a, {"wait": 0.0, "cold_load": 0.0, "reload": 0.0, "service": 2.0, "slowdown": 0.0,
                      "eviction": 0.0, "risk": 0.0, "eta": 2.0}),
                 (b, {"wait": 1.0, "cold_load": 5.0, "reload": 0.0, "service": 3.0, "slowdown": 0.0,
                      "eviction": 0.0, "risk": 0.0, "eta": 9.0})]
    # rate = min(50 / 5 s of load, 30 / 1 s of wait, 25 / 1 s slower) = 10 points a second
    (_, total_a, breakdown_a, _), (_, total_b, breakdown_b, _) = herd.score_candidates(estimates)[0]
    assert breakdown_a == {"thermal": 50, "memory_fit": 20, "queue_depth": 0, "latency_history": 0,
                           "role_affinity": 15, "availability_trend": 10, "context_fit": 15}
    assert total_a == 110
    assert breakdown_b == {"thermal": 0, "memory_fit": 20, "queue_depth": -10, "latency_history": -10,
                           "role_affinity": 15, "availability_trend": 10, "context_fit": 15}
    assert total_b == 40


def test_choose_takes_the_soonest_and_waits_for_a_busy_best():
    hot = make_node(loaded=["m:latest"])
    hot.node_id = "hot"
    cold = make_node()
    cold.node_id = "cold"
    call = make_call()
    lease, why = herd.choose([cold, hot], call, ["m:latest"], parallel=1, policy="strip", usual_output={}, queued={})
    assert (lease.node_id, why) == ("hot", None)
    run(hot, "m:latest", time.monotonic(), 0.5)  # busy for 0.5 s: still sooner than a 3 s load
    assert herd.choose([cold, hot], call, ["m:latest"], parallel=1, policy="strip", usual_output={},
                       queued={}) == (None, "busy")


def test_a_large_context_leaves_a_busy_node_alone_and_reloads_an_idle_one():
    # fast decodes 9x faster than slow (1.13 s against 10.2 s of work). A reload there costs 3 s,
    # priced twice (thermal and context_fit: 6 s, less than slow's 9.07 s slower) when no other
    # request wants the model there; with 32 started in the last 15.5 s it also keeps about
    # 2 a second waiting, each half of the 3 s: 32 / 15.5 x 3 x 3 / 2 = 9.3 s more
    call = make_call({"model": "m", "options": {"num_ctx": 8192}})
    now = time.monotonic()
    for traffic, expected in (((), "fast"), ([now - 0.5 * i for i in range(31, -1, -1)], "slow")):
        fast = make_node(loaded=["m:latest"], decode_speed=900.0, prefill_speed=18000.0)
        fast.node_id, fast.started["m:latest"] = "fast", traffic
        slow = make_node(loaded=["m:latest"], ctx=8192, decode_speed=100.0, prefill_speed=2000.0)
        slow.node_id = "slow"
        lease, _ = herd.choose([fast, slow], call, ["m:latest"], parallel=1, policy="strip", usual_output={},
                               queued={})
        assert lease.node_id == expected, lease.decision


def lease(loaded=4096, default=4096, pin=False, load_options=None):
    return herd.Lease(node_id="n", url="", model="m:latest", score=0, breakdown={}, loaded_ctx=loaded,
                      default_ctx=default, pin_ctx=pin, load_options=load_options or {})


PROTECTION = [
    # (what, options sent, lease, policy, options forwarded, context event or None)
    ("larger than loaded: passed through (the reload is needed)", {"num_ctx": 8192}, lease(), "strip",
     {"num_ctx": 8192}, "num_ctx 8192 > loaded 4096: passed through (reload)"),
    ("smaller, loaded at the default: stripped", {"num_ctx": 2048}, lease(), "strip", {},
     "num_ctx 2048 stripped (loaded 4096)"),
    ("smaller, loaded above the default: set to what runs", {"num_ctx": 2048}, lease(8192), "strip",
     {"num_ctx": 8192}, "num_ctx 2048 -> 8192 (loaded)"),
    ("absent, loaded above the default: set to what runs", {}, lease(8192), "strip", {"num_ctx": 8192},
     "num_ctx set to loaded 8192"),
    ("absent, default only guessed: named, not a change", {}, lease(pin=True), "strip", {"num_ctx": 4096}, None),
    ("equal to loaded with a guessed default: kept", {"num_ctx": 4096}, lease(pin=True), "strip",
     {"num_ctx": 4096}, None),
    ("written as a float", {"num_ctx": 2048.0}, lease(), "strip", {}, "num_ctx 2048 stripped (loaded 4096)"),
    ("num_gpu herd did not load with: stripped", {"num_gpu": 10}, lease(), "strip", {}, "num_gpu 10 stripped"),
    ("num_gpu herd loaded with: held", {"num_gpu": 10}, lease(load_options={"num_gpu": 20}), "strip",
     {"num_gpu": 20}, "num_gpu 10 -> 20 (loaded)"),
    ("warn: logs, forwards as sent", {"num_ctx": 2048}, lease(), "warn", {"num_ctx": 2048},
     "warn: num_ctx 2048 stripped (loaded 4096)"),
    ("passthrough: nothing", {"num_ctx": 2048}, lease(), "passthrough", {"num_ctx": 2048}, None),
]


@pytest.mark.parametrize("what, sent, held, policy, forwarded, event", PROTECTION, ids=[r[0] for r in PROTECTION])
def test_protect_context(what, sent, held, policy, forwarded, event):
    call = make_call({"model": "m", "options": dict(sent)})
    herd.protect_context(call, held, policy)
    assert call.options() == forwarded
    assert [e["context"] for e in call.events] == ([event] if event else [])


def test_protect_context_leaves_openai_requests_alone():
    call = make_call({"model": "m", "options": {"num_ctx": 2048}}, api="openai")
    herd.protect_context(call, lease(), "strip")
    assert call.options() == {"num_ctx": 2048} and not call.events


def context_node(reported=None, seen=None, loaded_ctx=(), sent_ctx=None):
    node = make_node({f"m{i}:latest": 1.0 for i in range(4)}, default_context_length=reported)
    node.default_ctx = dict(seen or {})
    node.loaded = {f"m{i}:latest": {"name": f"m{i}:latest", "size": GB, "context_length": ctx}
                   for i, ctx in enumerate(loaded_ctx)}
    node.load_options = {name: {"num_ctx": ctx} for name, ctx in (sent_ctx or {}).items()}
    return node


CONTEXT_DEFAULTS = [
    # (what, node, model asked about, expected default context)
    ("nothing known: Ollama's old 4096", context_node(), "m0:latest", 4096),
    ("the agent reported 32768", context_node(reported=32768), "m0:latest", 32768),
    ("seen for this model beats the report", context_node(reported=32768, seen={"m0:latest": 2048}), "m0:latest", 2048),
    ("guessed from what most models run with", context_node(loaded_ctx=(32768, 32768, 8192)), "m3:latest", 32768),
    ("a capped embedding default does not drag the guess down", context_node(seen={"m0:latest": 2048},
     loaded_ctx=(2048, 32768, 32768)), "m3:latest", 32768),
    ("the largest seen default beats a smaller common context", context_node(seen={"m0:latest": 32768},
     loaded_ctx=(32768, 4096, 4096)), "m3:latest", 32768),
    ("contexts herd loaded with a client's num_ctx are not the default", context_node(
     loaded_ctx=(16384, 16384, 4096), sent_ctx={"m0:latest": 16384, "m1:latest": 16384}), "m3:latest", 4096),
]


@pytest.mark.parametrize("what, node, model, expected", CONTEXT_DEFAULTS, ids=[r[0] for r in CONTEXT_DEFAULTS])
def test_context_default(what, node, model, expected):
    assert node.context_default(model) == expected


def test_running_keeps_ends_in_order_and_forgets_released_requests():
    group = herd.Running()
    leases = [herd.Lease(node_id="n", url="", model="m", score=0, breakdown={}, eta_s=eta, started=NOW)
              for eta in (5.0, 1.0, 3.0)]
    for held in leases:
        group.add(held)
    assert [group.nth_remaining(i, NOW) for i in range(3)] == [1.0, 3.0, 5.0]
    assert group.mean_remaining(NOW) == pytest.approx(3.0)
    group.remove(leases[1])
    assert (group.count, group.nth_remaining(0, NOW), group.longest_remaining(NOW)) == (2, 3.0, 5.0)
    assert group.longest_remaining(NOW + 5.2) == pytest.approx(2.2)  # 3 s one overdue by 2.2: as long again
    assert group.longest_remaining(NOW + 3.0) == pytest.approx(2.0)  # 5 s one: 2 to go; 3 s one just due
    assert group.longest_remaining(NOW + 3.1) == pytest.approx(1.9)
    assert group.nth_remaining(0, NOW + 3.0) == pytest.approx(0.4)  # ending now: a tenth of the mean 4 s


# (what, [(eta, started s ago, answered)], n, expected n-th remaining, expected stall)
RUNNING = [
    ("all to come", [(4, 1, True), (2, 1, True), (6, 1, True)], 1, 3.0, 0.0),
    ("one overdue by 4: between the two to come", [(1, 5, True), (2, 0, True), (10, 1, True)], 1, 4.0, 0.0),
    ("the last of three", [(1, 5, True), (2, 0, True), (10, 1, True)], 2, 9.0, 0.0),
    ("the overdue one after the soonest", [(1, 5, True), (2, 1.5, True), (10, 1, True)], 1, 4.0, 0.0),
    ("two overdue, the less overdue first", [(1, 5, True), (1, 3, True), (10, 1, True)], 0, 2.0, 0.0),
    ("unanswered past twice its estimate", [(1, 5, False), (2, 0, True)], 0, 2.0, 3.0),
    ("unanswered, within twice its estimate", [(2, 3, False)], 0, 1.0, 0.0),
    ("the oldest unanswered one counts", [(1, 9, True), (1, 4, False), (0.5, 3, False)], 0, 2.5, 2.0),
]


@pytest.mark.parametrize("what, leases, n, remaining, stall", RUNNING, ids=[r[0] for r in RUNNING])
def test_running_remaining_and_stall(what, leases, n, remaining, stall):
    group = herd.Running()
    for eta, ago, answered in leases:
        group.add(herd.Lease(node_id="n", url="", model="m", score=0, breakdown={}, eta_s=eta, started=NOW - ago,
                             answered=answered))
    assert group.nth_remaining(n, NOW) == pytest.approx(remaining)
    assert group.stalled(NOW) == pytest.approx(stall)


def alone_node(speed=1000.0):
    """A node that has shown its speed alone (three clean samples of `speed` GB/s)."""
    node = make_node()
    for _ in range(3):
        node.decode_gbs_alone.add(speed)
    return node


SHARING = [
    # (what, replies as (speed measured, streams of its model, models), batch exponent, cross exponent)
    # 4 streams of one model, each at 1000 / 4 ^ 0.5 = 500: b = log 2 / log 4 = 0.5
    ("batches badly: 4 streams each at half speed", [(500.0, 4, 1)] * 3, 0.5, herd.CROSS_SLOWDOWN),
    # 2 streams each at 1000 / 2 ^ 0.1 = 933: b = 0.1
    ("batches well", [(1000 / 2 ** 0.1, 2, 1)] * 3, 0.1, herd.CROSS_SLOWDOWN),
    # two models, one stream each, each at 1000 / 2 ^ 0.5 = 707 (after the batching prior, 1 ^ 0.3 = 1): c = 0.5
    ("two models share a fast GPU better than 1/m", [(1000 / 2 ** 0.5, 1, 2)] * 3, herd.BATCH_SLOWDOWN, 0.5),
    # two samples are not enough to replace a prior
    ("too few samples keep the prior", [(500.0, 4, 1)] * 2, herd.BATCH_SLOWDOWN, herd.CROSS_SLOWDOWN),
    # faster than alone (noise): slowdown 1, b = 0
    ("noise faster than alone counts as no slowdown", [(1200.0, 2, 1)] * 3, 0.0, herd.CROSS_SLOWDOWN),
]


@pytest.mark.parametrize("what, replies, batch, cross", SHARING, ids=[r[0] for r in SHARING])
def test_how_streams_share_a_node_is_learnt_from_its_replies(what, replies, batch, cross):
    node = alone_node()
    for speed, same, models in replies:
        herd.learn_sharing(node, speed, same, models)
    assert node.batch_exp == pytest.approx(batch, abs=1e-6) and node.cross_exp == pytest.approx(cross, abs=1e-6)


def test_nothing_is_learnt_about_sharing_before_the_speed_alone_is_known():
    node = make_node()
    for _ in range(5):
        herd.learn_sharing(node, 500.0, 4, 1)
    assert node.batch_exp == herd.BATCH_SLOWDOWN


def test_a_learnt_batching_exponent_changes_the_estimate():
    # 4 streams running (10 s left each) and one more: beside them, with b = 0.5, 5 ^ 0.5 = 2.236
    # against 5 ^ 0.3 = 1.621 under the prior: 3.4 s of work takes 7.60 s instead of 5.51 s
    node = make_node(loaded=["m:latest"])
    for _ in range(4):
        run(node, "m:latest", NOW, 10.0)
    prior = estimate(node, slots=8)["service"]
    node.batch_exp = 0.5
    learnt = estimate(node, slots=8)["service"]
    assert prior == pytest.approx(WORK * 5 ** 0.3, abs=1e-3) and learnt == pytest.approx(WORK * 5 ** 0.5, abs=1e-3)


# -- prompt caches ------------------------------------------------------------------------------

def chat_prefix(*messages):
    return herd.prompt_prefix({"messages": [{"role": r, "content": c} for r, c in messages]}, "/api/chat")


SYSTEM = ("system", "s" * 5000)  # 5000 characters: blocks of 2048, 2048 and 904


def test_a_prompt_is_a_chain_of_blocks_message_by_message():
    prefix = chat_prefix(SYSTEM, ("user", "hello"))
    assert prefix.ends == (2048, 4096, 5000, 5005) and prefix.replies == (False,) * 4
    other = chat_prefix(SYSTEM, ("user", "goodbye"))
    assert other.hashes[:3] == prefix.hashes[:3] and other.hashes[3] != prefix.hashes[3]
    assert herd.prompt_prefix({"input": "x"}, "/api/embed") == herd.Prefix()


def serve(node, *prompts, slots=4, at=NOW - 10):
    """`prompts` run at once on node's m:latest (each takes the slot the runner gives it), and end
    at `at`."""
    taken = [node.take_slot("m:latest", chat_prefix(*prompt), slots)[0] for prompt in prompts]
    for slot in taken:
        slot.used = at
        node.prompts["m:latest"].give_back(slot)
    return taken


CACHED = [
    # (what, prompts run one after another (a tuple: at once), the new prompt, characters cached)
    ("nothing held", [], [SYSTEM, ("user", "hi")], 0),
    ("the same system prompt", [[SYSTEM, ("user", "a")]], [SYSTEM, ("user", "b")], 5000),
    # the slot took [system, u1] and generated a1; the follow-up [system, u1, a1, u2] finds all
    # but u2 cached: 5000 + 2 + 3 characters
    ("a follow-up turn finds its history and the reply generated there",
     [[SYSTEM, ("user", "u1")]], [SYSTEM, ("user", "u1"), ("assistant", "a1!"), ("user", "u2")], 5005),
    ("the longest of two slots that ran at once", [([("user", "x")], [SYSTEM, ("user", "u1")])],
     [SYSTEM, ("user", "u1")], 5002),
    # one after another, an unrelated prompt overwrites the used slot rather than take an empty one
    ("an unrelated prompt overwrites the lowest used free slot", [[SYSTEM, ("user", "u1")], [("user", "x")]],
     [SYSTEM, ("user", "u1")], 0),
]


@pytest.mark.parametrize("what, held, wanted, chars", CACHED, ids=[c[0] for c in CACHED])
def test_cached_characters(what, held, wanted, chars):
    node = make_node(loaded=["m:latest"])
    for prompts in held:
        serve(node, *(prompts if isinstance(prompts, tuple) else [prompts]))
    body = {"model": "m", "messages": [{"role": r, "content": c} for r, c in wanted]}
    call = make_call(body, prompt_chars=sum(len(c) for _, c in wanted))
    call.prefix = herd.prompt_prefix(body, "/api/chat")
    assert estimate(node, call, slots=4)["cached_tokens"] * herd.CHARS_PER_TOKEN == chars


def test_slots_follow_the_runner_and_a_reload_forgets_them():
    node = make_node(loaded=["m:latest"])
    first, second = serve(node, [("user", "conversation 0")], [("user", "conversation 1")], slots=2)
    assert node.prompts["m:latest"].held == [first, second]  # two at once: one slot each, in order
    slot, before = node.take_slot("m:latest", chat_prefix(("user", "conversation 1"), ("assistant", "r"),
                                                          ("user", "more")), 2)
    assert slot is second and before == (chat_prefix(("user", "conversation 1")), NOW - 10)  # its own slot
    assert node.take_slot("m:latest", chat_prefix(("user", "conversation 1")), 2)[0] is first  # the only free one
    assert node.take_slot("m:latest", chat_prefix(("user", "x")), 2) == (None, None)  # none free
    restarted = node.take_slot("m:latest", chat_prefix(("user", "x")), 3)[0]  # 3 slots: Ollama restarted
    assert node.prompts["m:latest"].held == [restarted] and restarted not in (first, second)
    node.note_switch("m:latest", 8192, {}, 1.0)
    assert "m:latest" not in node.prompts


def test_cached_prompt_tokens_are_not_priced_again():
    # a 40,000-character history (10,000 tokens) on a node that holds it: only the new 400
    # characters (100 tokens) are evaluated: 100 x 4 GB / 6000 GB/s = 0.0667 s against 6.67 s
    history = [("user", "h" * 40_000)]
    node = make_node(loaded=["m:latest"])
    serve(node, history, slots=1)
    body = {"model": "m", "messages": [{"role": r, "content": c} for r, c in history + [("user", "n" * 400)]]}
    call = make_call(body, prompt_chars=40_400)
    call.prefix = herd.prompt_prefix(body, "/api/chat")
    held = estimate(node, call)
    cold = estimate(make_node(loaded=["m:latest"]), call)
    assert held["cached_tokens"] == 10_000 and held["prompt"] == pytest.approx(0.0667, abs=1e-3)
    assert cold["cached_tokens"] == 0 and cold["prompt"] == pytest.approx(6.7333, abs=1e-3)


def test_overwriting_a_conversation_costs_its_prompt_times_the_chance_it_comes_back():
    # one slot holds a 40,000-character conversation (10,000 tokens, evaluated again at
    # 4 GB / 6000 GB/s a token: 6.667 s) that ended 10 s ago; before any traffic, half the
    # requests continue a conversation and they come back within 300 s: chance 0.5 / (0.5 + 0.5)
    # = 0.5, so an unrelated prompt that would take that slot costs 3.333 s more; the follow-up
    # itself costs nothing; without follow_ups nothing is priced
    node = make_node(loaded=["m:latest"])
    serve(node, [("user", "h" * 40_000)], slots=1)
    other = make_call({"model": "m", "messages": [{"role": "user", "content": "x"}]}, prompt_chars=1)
    other.prefix = chat_prefix(("user", "x"))
    follow = make_call(prompt_chars=40_010)
    follow.prefix = chat_prefix(("user", "h" * 40_000), ("assistant", "r" * 5), ("user", "y" * 5))
    base = estimate(node, other)["eviction"]
    assert base == 0.0
    assert estimate(node, other, follow_ups=herd.FollowUps())["displaced"] == pytest.approx(3.3333, abs=1e-3)
    assert estimate(node, other, follow_ups=herd.FollowUps())["eviction"] == pytest.approx(3.3333, abs=1e-3)
    assert estimate(node, follow, follow_ups=herd.FollowUps())["displaced"] == 0.0


def test_what_another_slot_also_holds_is_not_lost():
    # two slots, both opened with the 5000-character system prompt, then 4000 characters each of
    # their own: an unrelated prompt takes the first, losing 4000 characters only (the system
    # prompt is in the other): 1000 tokens x 4 GB / 6000 GB/s x 0.5 = 0.3333 s
    node = make_node(loaded=["m:latest"])
    serve(node, [SYSTEM, ("user", "a" * 4000)], [SYSTEM, ("user", "b" * 4000)], slots=2)
    other = make_call({"model": "m", "messages": [{"role": "user", "content": "x"}]}, prompt_chars=1)
    other.prefix = chat_prefix(("user", "x"))
    assert estimate(node, other, slots=2, follow_ups=herd.FollowUps())["displaced"] == pytest.approx(0.3333, abs=1e-3)


def test_slots_freed_in_any_order_are_chosen_lowest_first_and_an_old_load_keeps_none():
    node = make_node(loaded=["m:latest"])
    taken = [node.take_slot("m:latest", chat_prefix(("user", p)), 4096)[0] for p in "abc"]
    caches = node.prompts["m:latest"]
    assert [slot.index for slot in taken] == [0, 1, 2] and caches.free == []  # 4093 never taken: empty
    for slot in (taken[2], taken[0], taken[1]):
        caches.give_back(slot)
    assert caches.free == taken
    assert node.take_slot("m:latest", chat_prefix(("user", "d")), 4096)[0] is taken[0]  # first among equals
    assert caches.free == taken[1:]
    node.note_switch("m:latest", 8192, {}, 1.0)  # a reload: slot 0's request ends in the old load
    node.slot_caches("m:latest", 4096).give_back(taken[0])
    assert node.prompts["m:latest"].free == [] and not taken[0].busy


def test_a_burst_on_a_node_with_hundreds_of_slots_leaves_at_most_32_followed():
    # 700 requests at once on a model with 4096 slots: herd follows the lowest 32, so that every
    # later choice looks at 32 caches at most (all 700 used to stay followed until a reload)
    node = make_node(loaded=["m:latest"])
    taken = [node.take_slot("m:latest", chat_prefix(("user", f"burst {i}")), 4096)[0] for i in range(700)]
    caches = node.prompts["m:latest"]
    assert caches.held == taken[:herd.MAX_TRACKED_SLOTS] == taken[:32]
    for slot in taken:
        caches.give_back(slot)
    assert caches.free == taken[:32]
    assert node.take_slot("m:latest", chat_prefix(("user", "burst 5"), ("assistant", "r"), ("user", "more")),
                          4096)[0] is taken[5]  # a followed conversation still finds its slot


def test_an_empty_slot_is_taken_after_a_used_one():
    node = make_node(loaded=["m:latest"])
    first, _ = serve(node, [("user", "a")], [("user", "b")], slots=3)
    assert node.take_slot("m:latest", chat_prefix(("user", "c")), 3)[0] is first
    assert herd.prompt_prefix({"model": "m", "prompt": ""}, "/api/generate") == herd.Prefix()  # a load only

FOLLOW_UP_CHANCES = [
    # (prompts of the cache's kind sent, and continued; gaps seen; age of the cache; chance)
    ((0, 0), (), 10, 0.5),  # priors: half, within 300 s
    ((0, 0), (), 400, 0.0),
    ((5, 0), (), 10, 0.0),  # nothing of this kind is ever continued: a script's requests
    # 3 of 4 continued (fewer than 5 sent: the prior half) and 3 of 5 gaps longer than 25 s:
    # 0.5 x 0.6 / (0.5 + 0.3) = 0.375
    ((4, 3), (10, 20, 30, 40, 50), 25, 0.375),
    # 4 of 5 continued: 0.8 x 0.6 / (0.2 + 0.48) = 0.705882
    ((5, 4), (10, 20, 30, 40, 50), 25, 0.705882),
    ((5, 4), (10, 20, 30, 40, 50), 60, 0.0),
    ((5, 5), (10, 20, 30), 10, 1.0),  # fewer than 5 gaps: the 300 s prior
]


@pytest.mark.parametrize("counts, gaps, age, chance", FOLLOW_UP_CHANCES)
def test_follow_up_chance(counts, gaps, age, chance):
    for held_reply in (True, False):  # each kind reads its own counts
        follow_ups = herd.FollowUps()
        follow_ups.sent[held_reply], follow_ups.continued[held_reply] = counts
        follow_ups.sent[not held_reply] = follow_ups.continued[not held_reply] = 4  # not enough to count
        for gap in gaps:
            follow_ups.gaps.add(float(gap))
        assert follow_ups.chance(age, held_reply) == pytest.approx(chance, abs=1e-6)


def test_follow_ups_are_learnt_from_prompts_continued_wherever_they_go():
    follow_ups = herd.FollowUps()
    first = chat_prefix(SYSTEM, ("user", "u1"))
    one_off = chat_prefix(("user", "a one-off request"))
    for prefix in (first, one_off):
        follow_ups.started(prefix, 90.0)
        follow_ups.finished(prefix, 100.0)
    second = chat_prefix(SYSTEM, ("user", "u1"), ("assistant", "a1"), ("user", "u2"))
    follow_ups.started(second, 112.0)  # 12 s after the reply it continues
    third = chat_prefix(SYSTEM, ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"),
                        ("user", "u3"))
    follow_ups.started(third, 130.0)  # herd never saw the second's reply end: no gap
    assert follow_ups.sent == {False: 2, True: 2} and follow_ups.continued == {False: 1, True: 1}
    assert list(follow_ups.gaps.ordered) == [12.0] and list(follow_ups.ended) == [one_off.hashes[-1]]


def ps_report(*loaded):
    """A heartbeat whose /api/ps shows `loaded` (name, GB, GB in VRAM)."""
    return {"ollama": {"reachable": True, "models": [{"name": name, "size": int(gb * GB)} for name, gb, _ in loaded],
                       "loaded": [{"name": name, "size": int(gb * GB), "size_vram": int(vram * GB),
                                   "context_length": 4096} for name, gb, vram in loaded]}}


def test_beside_a_split_model_requests_wait_unloaded():
    # herd sent small requests while big was loading; /api/ps now shows big split with system RAM
    # and small gone: small's requests are waiting for big, not running, so small is cold here
    node = make_node({"small:latest": 1.0, "big:latest": 20.0}, loaded=["small:latest"])
    node.hold(herd.Lease(node_id="n", url="", model="small:latest", score=0, breakdown={}, started=time.monotonic()))
    node.apply_report(ps_report(("big:latest", 20.0, 12.0)))
    assert set(node.loaded) == {"big:latest"} and node.split("big:latest")
    node.apply_report(ps_report(("small:latest", 1.0, 1.0)))  # big left; herd remembers it splits here
    assert node.split("big:latest") and herd.pushed_out(node, "big:latest") == ["small:latest"]
    node.apply_report(ps_report(("mid:latest", 8.0, 8.0)))  # not split: busy small is taken as still there
    assert node.loaded.keys() == {"small:latest", "mid:latest"}



def gpu_node(vram_gb, unified=False, kv_share=0.0):
    node = make_node({"big:latest": 20.0, "small:latest": 1.0}, loaded=["small:latest"])
    node.gpu = {"kind": "apple" if unified else "nvidia", "vram_total_gb": vram_gb, "unified": unified}
    node.kv_share = kv_share
    return node


VRAM_SHARES = [
    # (what, node, expected share of big:latest in VRAM before /api/ps has shown it)
    ("20 GB on a 12 GB card: 12 / 20", gpu_node(12), 0.6),
    ("and 8% per 4k of KV at 4096: 12 / 21.6", gpu_node(12, kv_share=0.08 / 4096), 0.5556),
    ("20 GB on a 24 GB card: in VRAM", gpu_node(24), None),
    ("with 25% of KV it no longer fits: 24 / 25", gpu_node(24, kv_share=0.25 / 4096), 0.96),
    ("unified memory: the budget decides, not the GPU", gpu_node(12, unified=True), None),
    ("no GPU reported", make_node({"big:latest": 20.0}), None),
]


@pytest.mark.parametrize("what, node, expected", VRAM_SHARES, ids=[row[0] for row in VRAM_SHARES])
def test_vram_share_expected_from_the_reported_gpu(what, node, expected):
    assert node.vram_share("big:latest") == (pytest.approx(expected, abs=1e-4) if expected else None)


def test_the_kv_cache_is_learnt_from_what_the_largest_loaded_model_takes_beyond_its_size():
    node = make_node({"m:latest": 4.0, "tiny:latest": 0.5})
    # at 4096: m takes 8% more than on disk; tiny 50% more (a fixed overhead), which is left out
    node.apply_report(ps_report(("m:latest", 4.0, 4.32), ("tiny:latest", 0.5, 0.75)))
    assert node.kv_share * 4096 == pytest.approx(0.08)


def test_a_model_shown_whole_in_vram_is_not_expected_to_split_when_it_comes_back():
    node = gpu_node(24, kv_share=0.5 / 4096)  # an overstated KV share: 20 x 1.5 > 24
    node.apply_report(ps_report(("big:latest", 20.0, 20.0)))  # /api/ps: all of it in VRAM
    node.apply_report(ps_report(("small:latest", 1.0, 1.0)))  # unloaded since
    node.models["big:latest"] = {"name": "big:latest", "size": int(20 * GB)}  # (still on disk there)
    assert node.vram_share("big:latest") is None and not node.split("big:latest")



def test_a_model_too_large_for_the_vram_loads_alone_and_a_report_from_before_does_not_undo_it():
    node = gpu_node(12)
    node.note_switch("big:latest", 4096, {"num_ctx": None}, 1.0, at_default=True)
    assert node.split("big:latest") and set(node.loaded) == {"big:latest"}  # small is pushed out
    node.apply_report(ps_report(("small:latest", 1.0, 1.0)))  # /api/ps read before the load began
    assert set(node.loaded) == {"big:latest"}

def test_a_split_model_is_not_preloaded_where_it_would_push_others_out():
    node = gpu_node(12)
    node.decode_speed, node.memory_budget_gb = 500.0, 64.0
    demand = {"big:latest": [NOW - 1, NOW - 2, NOW - 3]}
    assert herd.plan_preload([node], demand, time.time(), NOW) is None
    node.loaded.clear()  # nothing to push out: it may load there
    assert herd.plan_preload([node], demand, time.time(), NOW)[1] == "big:latest"

def test_a_node_loading_another_model_is_not_preloaded_until_that_load_is_done():
    node = gpu_node(24)
    node.decode_speed, node.memory_budget_gb = 500.0, 64.0
    node.loaded.clear()
    now = time.monotonic()
    demand = {"big:latest": [now - 1, now - 2, now - 3]}
    node.note_switch("small:latest", 4096, {"num_ctx": None}, 5.0, at_default=True)  # done in 5 s
    assert herd.plan_preload([node], demand, time.time(), now) is None
    assert herd.plan_preload([node], demand, time.time(), now + 6)[1] == "big:latest"


def test_requests_waiting_in_herds_queue_get_their_model_a_new_home():
    # m (4 GB) is hot on the fast node only; the slower one has 6 GB: 4.6 with headroom leaves
    # 1.4 GB, under the quarter kept spare for a second home, so only a queue loads it there
    hot = make_node(loaded=["m:latest"], node_id="fast", decode_speed=900.0, budget_gb=24)
    spare = make_node(node_id="slow", decode_speed=400.0, budget_gb=6)
    demand = {"m:latest": [NOW - 1, NOW - 2]}

    def plan(backlog):
        found = herd.plan_preload([hot, spare], demand, time.time(), NOW, backlog)
        return found and (found[0].node_id, found[2])

    assert plan(None) is None and plan({}) is None
    # no load timed there yet: the prior is a guess, so a queue is reason enough
    assert plan({"m:latest": 0.2}) == ("slow", "requests for it wait in herd's queue, and the node has not "
                                               "timed a load yet")
    # a load there takes 0.5 + 4 x 0.5 = 2.5 s: only a queue that has lasted that long
    spare.load_cost = (0.5, 0.5)
    assert plan({"m:latest": 2.4}) is None
    assert plan({"m:latest": 2.5}) == ("slow", "requests for it have waited 2.5 s in herd's queue, as long "
                                               "as a load there")
    spare.load_cost, spare.decode_speed = None, 200.0  # more than four times slower than `fast`
    assert plan({"m:latest": 60.0}) is None


def test_the_queue_counts_requests_for_a_model_not_its_fallbacks_and_one_new_home_a_minute():
    pinned = make_call()
    pinned.only_node = "n"  # herd's own benchmark of one node: a load elsewhere cannot help it
    waiters = [herd.Waiter(call=make_call(), models=["m:latest", "f:latest"], enqueued=97.0),
               herd.Waiter(call=make_call(), models=["m:latest"], enqueued=98.5),
               herd.Waiter(call=pinned, models=["p:latest"], enqueued=91.0),
               herd.Waiter(call=make_call(), models=["c:latest"], enqueued=90.0, cancelled=True)]
    assert herd.queue_backlog(waiters, {}, NOW, 100.0) == {"m:latest": 3.0}  # the oldest: 100 - 97
    # given a new home 59 s ago: not again within the minute; 60 s ago: again
    assert herd.queue_backlog(waiters, {"m:latest": NOW - 59}, NOW, 100.0) == {}
    assert herd.queue_backlog(waiters, {"m:latest": NOW - 60}, NOW, 100.0) == {"m:latest": 3.0}


def held_large(**fields):
    """m (4 GB) loaded at 16384 on a node whose default is 4096 (a large num_ctx loaded it)."""
    return make_node(loaded=["m:latest"], ctx=16384, default_context_length=4096, **fields)


OPENAI = make_call(api="openai", endpoint="/v1/chat/completions")


def native(options=None):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **({"options": options} if options else {})}
    return make_call(body)


def switching_back():
    node = held_large()
    node.note_switch("m:latest", 4096, {"num_ctx": None}, 5.0, at_default=True)
    return node


RESTORABLE = [
    # (what, node, call, context protection, expected)
    ("/v1 cannot set num_ctx: it would reload 16384 back to 4096", held_large(), OPENAI, "strip", True),
    ("native without num_ctx: herd sends it at 16384", held_large(), native(), "strip", False),
    ("the same, passed through: Ollama reloads it to the default", held_large(), native(), "passthrough", True),
    ("native asking 16384: runs as loaded", held_large(), native({"num_ctx": 16384}), "passthrough", False),
    ("native asking 32768: the default would not serve it either", held_large(), native({"num_ctx": 32768}),
     "strip", False),
    ("loaded at the default already", make_node(loaded=["m:latest"], default_context_length=4096), OPENAI,
     "strip", False),
    ("not loaded", make_node(default_context_length=4096), OPENAI, "strip", False),
    ("herd is reloading it back already", switching_back(), OPENAI, "strip", False),
]


@pytest.mark.parametrize("what, node, call, policy, expected", RESTORABLE, ids=[row[0] for row in RESTORABLE])
def test_restorable(what, node, call, policy, expected):
    assert herd.restorable(node, "m:latest", call, policy) is expected


def rent_fleet(held_speed):
    """`held`: m at 16384, idle, decoding at `held_speed` GB/s; `busy`: m at the default 4096,
    300 GB/s, its one slot taken by a request with 3 s left."""
    held = held_large(node_id="held", decode_speed=held_speed)
    other = make_node(loaded=["m:latest"], node_id="busy", default_context_length=4096, decode_speed=300.0)
    run(other, "m:latest", time.monotonic(), 3.0)
    return [held, other]


LARGE = native({"num_ctx": 16384})
WAITING = [
    # (what, held's GB/s, queued calls, requests counted for held, held kept at 16384)
    # per waiter on busy: 3 s for the slot (and 3.4 more for each one ahead) + 3.4 s of work;
    # on held without the 3 s reload (1 s + 4 GB x 0.5 s/GB): 0.07 + 250 x 4 / 900 = 1.2 s
    ("two /v1 requests, sooner on held at 4096", 900.0, [OPENAI, OPENAI], 2, False),
    # at 30 GB/s: 250 x 4 / 30 = 33 s, later than busy's 6.4 s (9.8 s for the second)
    ("held too slow to be worth it", 30.0, [OPENAI, OPENAI], 0, False),
    ("native requests run there as it is: no rent", 900.0, [native(), native()], 0, False),
    ("a queued request that needs 16384 keeps it", 900.0, [OPENAI, LARGE], 1, True),
]


@pytest.mark.parametrize("what, held_speed, calls, counted, kept", WAITING, ids=[row[0] for row in WAITING])
def test_waiting_for_default(what, held_speed, calls, counted, kept):
    nodes = rent_fleet(held_speed)
    waiters = [herd.Waiter(call=call, models=["m:latest"], enqueued=0.0) for call in calls]
    counts, keep = herd.waiting_for_default(nodes, waiters, parallel=1, policy="strip", usual_output={},
                                            priors=herd.Priors(), now=time.time(), now_mono=time.monotonic())
    key = ("held", "m:latest", 16384)
    assert dict(counts) == ({key: counted} if counted else {})
    assert keep == ({key} if kept else set())


def test_nothing_is_waited_for_when_every_model_runs_at_its_default():
    nodes = [make_node(loaded=["m:latest"], node_id=name, default_context_length=4096) for name in ("a", "b")]
    run(nodes[0], "m:latest", time.monotonic(), 3.0)
    waiters = [herd.Waiter(call=OPENAI, models=["m:latest"], enqueued=0.0)]
    assert herd.waiting_for_default(nodes, waiters, parallel=1, policy="strip", usual_output={}, priors=herd.Priors(),
                                    now=time.time(), now_mono=time.monotonic()) == ({}, set())


def idle_held():
    return held_large(node_id="held")


def busy_held():
    node = idle_held()
    run(node, "m:latest", NOW, 2.0)
    return node


def offline_held():
    node = idle_held()
    node.last_seen -= 3600
    return node


KEY = ("held", "m:latest", 16384)
RESTORES = [
    # (what, the node (made when the test runs: it must still count as online), rent, kept,
    # expected (node, model, reload s)); the reload there: 1 s + 4 GB x 0.5 s/GB = 3 s
    ("waited less than the reload takes", idle_held, {KEY: 2.9}, set(), None),
    ("waited as long", idle_held, {KEY: 3.0}, set(), ("held", "m:latest", 3.0)),
    ("counted at a context it no longer runs", idle_held, {("held", "m:latest", 8192): 30.0}, set(), None),
    ("a node that left", idle_held, {("gone", "m:latest", 16384): 30.0}, set(), None),
    ("a request of it still running there", busy_held, {KEY: 30.0}, set(), None),
    ("a queued request needs its context", idle_held, {KEY: 30.0}, {KEY}, None),
    ("offline", offline_held, {KEY: 30.0}, set(), None),
]


def test_a_restore_that_fails_leaves_the_next_report_to_say_what_runs():
    fleet = herd.Fleet(herd.Config())
    entry = {"name": "m:latest", "model": "m:latest", "size": 4 * GB}
    fleet.report("held", "http://127.0.0.1:1", "agent", 3600.0,
                 {"default_context_length": 4096,
                  "ollama": {"reachable": True, "models": [entry], "loaded": [dict(entry, context_length=16384)]}})
    node = fleet.nodes["held"]
    node.preloading = "m:latest"
    node.note_switch("m:latest", 4096, {"num_ctx": None}, 3.0, at_default=True)  # as restore_plan notes it
    fleet.preloaded(herd.WarmLoad("held", node.url, "m:latest", "test", restore=True), False, 0.2)
    assert node.preloading is None and node.switching == {}
    fleet.report("held", "http://127.0.0.1:1", "agent", 3600.0,
                 {"default_context_length": 4096,
                  "ollama": {"reachable": True, "models": [entry], "loaded": [dict(entry, context_length=16384)]}})
    assert node.running_context("m:latest") == 16384 and node.loads == []


@pytest.mark.parametrize("what, make, rent, kept, expected", RESTORES, ids=[row[0] for row in RESTORES])
def test_plan_restore(what, make, rent, kept, expected):
    plan = herd.plan_restore([make()], rent, kept, herd.Priors(), time.time(), NOW)
    assert (plan and (plan[0].node_id, plan[1], plan[2])) == expected


@pytest.mark.parametrize("what, nodes, name, expected", [
    ("spelled as an online node has it", [("online", ["Llama3.2:latest"])], "Llama3.2:latest", "Llama3.2:latest"),
    ("another case: the node's", [("online", ["llama3.2:latest"])], "LLAMA3.2:latest", "llama3.2:latest"),
    ("no node has it: as asked", [("online", ["qwen:latest"])], "Llama3.2:latest", "Llama3.2:latest"),
    ("an offline node's spelling gives way to an online one's",
     [("offline", ["Llama3.2:latest"]), ("online", ["llama3.2:latest"])], "Llama3.2:latest", "llama3.2:latest"),
    ("a resting node's too", [("resting", ["Llama3.2:latest"]), ("online", ["llama3.2:latest"])],
     "Llama3.2:latest", "llama3.2:latest"),
    ("none online: any node's", [("offline", ["Llama3.2:latest"])], "LLAMA3.2:latest", "Llama3.2:latest"),
])
def test_model_spelling(what, nodes, name, expected):
    made = []
    for i, (state, models) in enumerate(nodes):
        node = make_node({m: 1.0 for m in models}, node_id=f"n{i}")
        if state == "offline":
            node.last_seen -= 3600
        elif state == "resting":
            node.cooldown_until = time.time() + 60
        made.append(node)
    assert herd.model_spelling(made, name, time.time()) == expected


def test_a_load_that_waited_for_another_is_not_learnt_from():
    # Ollama loads one model at a time: a cold request sent while herd had another model loading
    # there reports a load_duration that includes that load; one sent to an idle node its own
    fleet = herd.Fleet(herd.Config())
    entry = {"name": "m:latest", "model": "m:latest", "size": 2 * GB}
    other = {"name": "o:latest", "model": "o:latest", "size": 2 * GB}
    fleet.report("a", "http://127.0.0.1:1", "agent", 5.0,
                 {"ollama": {"reachable": True, "models": [entry, other], "loaded": []}})
    node = fleet.nodes["a"]
    node.decode_speed = 300.0
    node.note_switch("o:latest", 4096, {"num_ctx": None}, 30.0, at_default=True)  # loading for 30 s
    served = {"eval_count": 100, "eval_s": 1.0, "load_s": 9.0}
    lease = fleet.acquire(make_call())
    assert lease.cold and not lease.timed_alone
    fleet.release(lease, served=True, timings=served)
    assert node.load_cost is None
    del node.switching["o:latest"], node.loaded["m:latest"]  # the other load is over; m left again
    lease = fleet.acquire(make_call())
    assert lease.cold and lease.timed_alone
    fleet.release(lease, served=True, timings=dict(served, load_s=3.0))
    assert node.loads == [(2.0, 3.0)]


LOAD_COSTS = [
    # (what, (GB, seconds) loads, (fixed s, s per GB) expected, worked out by hand)
    ("none yet", [], None),
    ("one load: at most 1 s of it start-up", [(2.0, 3.0)], (1.0, 1.0)),  # (3 - 1) / 2
    ("a quick load: half of it start-up", [(1.0, 0.8)], (0.4, 0.4)),
    # an embedding model's load is mostly start-up; per GB it counts for its 0.67 GB, the 18.5 GB
    # model's for 18.5: (1.3 - 0.405) / 18.5 = 0.0484 s/GB, not the mean with (0.81 - 0.405) / 0.67
    ("a small model does not price a large one", [(18.5, 1.3), (0.67, 0.81)], (0.405, 0.895 / 18.5)),
    # per GB 1.0, 1.0, 1.0 (weights 1, 4, 8) and 3.625 for the slow one (weight 8): 21 GB, the
    # median GB falls in the 1.0s (13 of 21 GB)
    ("one slow load of four", [(1.0, 2.0), (4.0, 5.0), (8.0, 9.0), (8.0, 30.0)], (1.0, 1.0)),
    # two loads of one size, one from the page cache: between them, (3 - 1) / 4 and (9 - 1) / 4
    ("two of one size: their mean", [(4.0, 9.0), (4.0, 3.0)], (1.0, 1.25)),
    # 1 GB at (2 - 1) / 1 = 1.0 against 8 GB at (3 - 1) / 8 = 0.25: the 8 GB count eight times
    ("the larger load counts more", [(1.0, 2.0), (8.0, 3.0)], (1.0, 0.25)),
]


@pytest.mark.parametrize("what, loads, expected", LOAD_COSTS, ids=[r[0] for r in LOAD_COSTS])
def test_load_costs(what, loads, expected):
    assert herd.load_costs(loads) == (pytest.approx(expected) if expected else None)


LOAD_SAMPLES = [
    # (what, timings of a cold reply of m (2 GB), lease fields, the (GB, seconds) sample learnt)
    ("native: Ollama's load_duration", {"load_s": 3.0}, {}, [(2.0, 3.0)]),
    ("under 50 ms: it was hot after all", {"load_s": 0.01}, {}, []),
    # an OpenAI stream: its first byte after 4 s, of which herd expected 0.5 s of prompt
    ("OpenAI stream: first byte less the prompt", {"first_byte_s": 4.0}, {"prompt_s": 0.5}, [(2.0, 3.5)]),
    # a first byte after 0.3 s of which 0.2 s were to be prompt: hot after all, or a slow prompt
    ("OpenAI stream: mostly prompt, not a load", {"first_byte_s": 0.3}, {"prompt_s": 0.2}, []),
    ("held up by another load or busy models", {"load_s": 3.0}, {"timed_alone": False}, []),
]


@pytest.mark.parametrize("what, timings, fields, expected", LOAD_SAMPLES, ids=[r[0] for r in LOAD_SAMPLES])
def test_load_times_learnt_from_a_cold_reply(what, timings, fields, expected):
    node = make_node({"m:latest": 2.0}, decode_speed=300.0)
    lease = herd.Lease(node_id="n", url=node.url, model="m:latest", score=0, breakdown={}, cold=True, **fields)
    node.hold(lease)
    herd.learn_from_reply(node, lease, dict({"eval_count": 100, "eval_s": 1.0}, **timings))
    assert node.loads == pytest.approx(expected)


def test_a_slot_freed_under_a_long_queue_is_granted_without_looking_at_every_waiter(monkeypatch):
    # 30 one-slot nodes, all busy, and 200 queued requests: when one slot frees, the oldest waiter
    # takes it and the other 199 are passed over once the model has no free slot left; each
    # model's nodes are looked at once per grant, not once per waiter (that was 200 x 30 checks)
    fleet = herd.Fleet(herd.Config())
    entry = {"name": "m:latest", "model": "m:latest", "size": 2 * GB}
    for k in range(30):
        fleet.report(f"n{k}", f"http://127.0.0.1:{1000 + k}", "agent", 3600.0,
                     {"num_parallel": 1, "ollama": {"reachable": True, "models": [entry],
                                                    "loaded": [dict(entry, size_vram=2 * GB, context_length=4096)]}})
    leases = [fleet.acquire(make_call()) for _ in range(30)]
    waiters = [herd.Waiter(call=make_call(), models=["m:latest"], enqueued=time.perf_counter()) for _ in range(200)]
    fleet.waiters.extend(waiters)
    fleet.queued.update({"m:latest": 200})
    looked = []
    monkeypatch.setattr(herd, "eligibility", lambda node, model, now, real=herd.eligibility: looked.append(node)
                        or real(node, model, now))
    fleet.release(leases[7], served=True)
    assert waiters[0].lease is not None and waiters[0].lease.node_id == leases[7].node_id
    assert all(w.lease is None for w in waiters[1:]) and len(fleet.waiters) == 199
    assert len(looked) <= 3 * 30


def test_the_priors_change_when_a_node_is_first_measured_and_not_at_every_reply():
    # a node measured for speed but never seen loading: its replies move its speed, not the
    # priors (worked out again at most once a second); its first cold load changes them at once
    fleet = herd.Fleet(herd.Config())
    entry = {"name": "m:latest", "model": "m:latest", "size": 2 * GB}
    fleet.report("a", "http://127.0.0.1:1", "agent", 5.0,
                 {"ollama": {"reachable": True, "models": [entry],
                             "loaded": [dict(entry, size_vram=2 * GB, context_length=4096)]}})
    fleet.nodes["a"].decode_speed = 300.0
    served = {"eval_count": 100, "eval_s": 1.0, "prompt_count": 10, "prompt_s": 0.01, "load_s": 0.001}
    fleet.release(fleet.acquire(make_call()), served=True, timings=served)
    priors = fleet.priors
    assert priors is not None
    fleet.release(fleet.acquire(make_call()), served=True, timings=dict(served, eval_s=0.5))
    assert fleet.priors is priors and fleet.nodes["a"].load_cost is None
    lease = fleet.acquire(make_call())
    lease.cold = lease.timed_alone = True  # (as if herd had expected a load, nothing else under way)
    fleet.release(lease, served=True, timings=dict(served, load_s=3.0))
    assert fleet.nodes["a"].load_cost is not None and fleet.priors is None


def brute_force_choice(slots, prefix):
    """choose_slot as the runner's rule reads, slot by slot: (slot, blocks cached there)."""
    def cached(slot):
        held, wanted = slot.prefix.hashes, prefix.hashes
        shared = 0
        while shared < min(len(held), len(wanted)) and held[shared] == wanted[shared]:
            shared += 1
        if shared == len(held):  # its whole prompt: the reply it generated follows
            while shared < len(prefix.replies) and prefix.replies[shared]:
                shared += 1
        return shared
    ranked = [((cached(slot) if slot.prefix.hashes else 0, bool(slot.prefix.hashes)), -slot.index, slot)
              for slot in slots.free]
    if ranked:
        rank, _, slot = max(ranked, key=lambda r: r[:2])
        if rank[1] or len(slots.held) >= slots.count:
            return slot, rank[0]
        return slot, 0
    return (None, 0) if len(slots.held) >= slots.count else ("new", 0)


def brute_force_overwritten(slots, slot, blocks):
    held = slot.prefix
    kept = min(blocks, len(held.hashes))
    for other in slots.held:
        if other is not slot:
            shared = 0
            while shared < min(len(other.prefix.hashes), len(held.hashes)) and \
                    other.prefix.hashes[shared] == held.hashes[shared]:
                shared += 1
            kept = max(kept, shared)
    return held.ends[-1] - (held.ends[kept - 1] if kept else 0) if held.hashes and kept < len(held.hashes) else 0


@pytest.mark.parametrize("seed", range(20))
def test_slot_choices_looked_up_by_hash_match_the_runners_rule_slot_by_slot(seed):
    # random conversations (half behind one system prompt) start, continue, fail and end on a
    # model with 5 slots; every choice and every overwrite priced must be what comparing the
    # prompt with each slot in turn gives
    rng = random.Random(seed)
    slots = herd.ModelSlots(5)
    histories = [[SYSTEM] if rng.random() < 0.5 else [] for _ in range(8)]
    running = []
    for _ in range(300):
        if running and rng.random() < 0.45:
            slot, before = running.pop(rng.randrange(len(running)))
            slots.give_back(slot, None if rng.random() < 0.8 else before)
            continue
        talk = rng.choice(histories)
        if talk and talk[-1][0] == "user" and rng.random() < 0.7:
            talk.append(("assistant", f"reply {rng.random()}"))
        talk.append(("user", rng.choice(["short", "x" * 3000, f"q {rng.random()}"])))
        prefix = chat_prefix(*talk)
        slot, blocks = herd.choose_slot(slots, prefix)
        expected_slot, expected_blocks = brute_force_choice(slots, prefix)
        assert blocks == expected_blocks
        assert slot is expected_slot or (expected_slot == "new" and slot.index == len(slots.held))
        if slot is None:
            continue
        if slot.used or slot.prefix.hashes:
            assert herd.overwritten_chars(slots, slot, blocks) == brute_force_overwritten(slots, slot, blocks)
        before = slot.prefix
        slots.take(slot, prefix)
        running.append((slot, before))

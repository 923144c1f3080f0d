"""Routing: which node a request lands on, and how many run at once."""

import collections
import concurrent.futures
import json
import time

import openai
import pytest
import requests

from conftest import CHAT, OPENAI_CHAT, chat, heartbeat, wait_for


def test_routes_to_the_node_where_the_model_is_hot(make_fake, make_router):
    cold = make_fake(models={"llama3.2": 2.0})
    hot = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("cold", cold.url), ("hot", hot.url)])
    nodes = [chat(router).headers["X-Herd-Node"] for _ in range(10)]
    assert nodes == ["hot"] * 10
    assert cold.served == 0


def test_equal_nodes_share_the_load(make_fake, make_router):
    fakes = [make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"]) for _ in range(3)]
    router = make_router(nodes=[(f"n{i}", f.url) for i, f in enumerate(fakes)])
    counts = collections.Counter(chat(router).headers["X-Herd-Node"] for _ in range(60))
    assert set(counts) == {"n0", "n1", "n2"}  # the first-registered node does not win every tie
    assert min(counts.values()) >= 8


def test_model_names_are_normalised_at_the_door(make_fake, make_router):
    fake = make_fake(models={"llama3.2:latest": 2.0})
    router = make_router(nodes=[("a", fake.url)])
    for name in ("llama3.2", "llama3.2:latest", " llama3.2 "):
        response = chat(router, dict(CHAT, model=name))
        assert response.status_code == 200
        assert response.headers["X-Herd-Model"] == "llama3.2:latest"
        assert fake.received[-1][1]["model"] == name.strip()  # the node is sent the name herd routed


def test_never_more_in_flight_per_model_than_the_node_runs_in_parallel(make_fake, make_router):
    fakes = [make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], token_delay=0.02) for _ in range(2)]
    router = make_router(nodes=[("a", fakes[0].url), ("b", fakes[1].url)])
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: chat(router).status_code, range(24)))
    assert statuses == [200] * 24
    assert [f.max_active["llama3.2:latest"] for f in fakes] == [1, 1]  # Ollama's default: one at a time
    assert fakes[0].served + fakes[1].served == 24
    queued = router.traces("SELECT COUNT(*) FROM request_traces WHERE queue_ms > 0")[0][0]
    assert queued > 0  # the rest waited in herd's queue, not inside Ollama


def test_num_parallel_from_the_heartbeat_sets_the_cap(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], token_delay=0.03)
    router = make_router()
    assert heartbeat(router, "big", fake, num_parallel=3).status_code == 200
    router.wait_online(1)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(lambda _: chat(router).status_code, range(20)))
    assert statuses == [200] * 20
    assert fake.max_active["llama3.2:latest"] == 3


def test_parallel_flag_applies_to_nodes_that_do_not_report(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], token_delay=0.03)
    router = make_router(nodes=[("a", fake.url)], parallel=2)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: chat(router), range(16)))
    assert fake.max_active["llama3.2:latest"] == 2


def test_queue_wait_is_bounded_with_503_and_retry_after(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=3, token_delay=0.5)
    router = make_router(nodes=[("a", fake.url)], queue_timeout=0.3)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, router)
        wait_for(lambda: fake.active.get("llama3.2:latest"), what="first request running")
        second = chat(router)
        assert first.result().status_code == 200
    assert second.status_code == 503
    assert "Retry-After" in second.headers
    assert "no slot" in second.json()["error"]


def test_full_queue_is_refused_at_once(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=3, token_delay=0.4)
    router = make_router(nodes=[("a", fake.url)], max_queue=1)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = pool.submit(chat, router)
        wait_for(lambda: fake.active.get("llama3.2:latest"), what="first request running")
        waiting = pool.submit(chat, router)
        wait_for(lambda: router.status()["fleet"]["requests_queued"] == 1, what="one queued")
        refused = chat(router)
        assert refused.status_code == 503 and "queue is full" in refused.json()["error"]
        assert running.result().status_code == 200 and waiting.result().status_code == 200


def test_waiting_requests_are_served_oldest_first(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=2, token_delay=0.15)
    router = make_router(nodes=[("a", fake.url)])
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = []
        for index in range(6):
            futures.append(pool.submit(lambda i: chat(router, dict(CHAT, messages=[
                {"role": "user", "content": f"q{i}"}])), index))
            wait_for(lambda: router.status()["fleet"]["requests_queued"] + len(fake.received) >= index + 1,
                     what="request queued")
        for future in futures:
            future.result()
    sent = [body["messages"][0]["content"] for _, body in fake.received]
    assert sent == [f"q{i}" for i in range(6)]


def test_model_missing_on_a_node_is_never_routed_there(make_fake, make_router):
    has = make_fake(models={"llama3.2": 2.0})
    lacks = make_fake(models={"qwen2.5:7b": 4.0}, loaded=["qwen2.5:7b"])
    router = make_router(nodes=[("has", has.url), ("lacks", lacks.url)])
    assert {chat(router).headers["X-Herd-Node"] for _ in range(10)} == {"has"}


def test_model_bigger_than_every_memory_budget_is_refused(make_fake, make_router):
    fake = make_fake(models={"llama3.3:70b": 40.0})
    router = make_router()
    heartbeat(router, "small", fake, memory_budget_gb=16)
    router.wait_online(1)
    response = chat(router, dict(CHAT, model="llama3.3:70b"))
    assert response.status_code == 507
    assert "does not fit" in response.json()["error"]


def test_fleet_status_reports_nodes_models_and_counts(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=3, token_delay=0.3)
    router = make_router()
    heartbeat(router, "box", fake, num_parallel=2, gpu={"vram_total_gb": 24, "vram_used_gb": 3})
    router.wait_online(1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(chat, router)
        wait_for(lambda: fake.active.get("llama3.2:latest"), what="request running")
        status = router.status()
        future.result()
    node = status["nodes"][0]
    assert status["fleet"]["requests_active"] == 1 and status["fleet"]["nodes_online"] == 1
    assert node["node_id"] == "box" and node["status"] == "online" and node["num_parallel"] == 2
    assert node["gpu"] == {"vram_total_gb": 24, "vram_used_gb": 3}
    assert node["models_loaded"] == [{"name": "llama3.2:latest", "size_vram": 2 * 1024 ** 3, "size": 2 * 1024 ** 3,
                                      "context_length": 4096, "expires_at": "2099-01-01T00:00:00Z",
                                      "requests_active": 1, "conversations": 1}]


def test_every_decision_carries_its_score_breakdown(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("a", fake.url)])
    chat(router)
    (breakdown, score), = router.traces("SELECT scores_breakdown, score FROM request_traces")
    signals = json.loads(breakdown)
    assert set(signals) == {"thermal", "memory_fit", "queue_depth", "latency_history", "role_affinity",
                            "availability_trend", "context_fit"}
    assert signals["thermal"] == 50
    assert abs(sum(signals.values()) - score) < 0.05


def fast_and_slow(make_fake, make_router, preload=True):
    """Two nodes with llama3.2: `slow` has it hot, `fast` (ten times faster) has room for it."""
    fast = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.0}, loaded=["qwen2.5:7b"])
    slow = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    fast.eval_duration_ns = 10_000_000  # 5 tokens in 10 ms
    slow.eval_duration_ns = 100_000_000  # 5 tokens in 100 ms
    router = make_router()
    router.herd.change_settings({"preload": preload})
    heartbeat(router, "fast", fast, memory_budget_gb=32)
    heartbeat(router, "slow", slow, memory_budget_gb=32)
    router.wait_online(2)
    return fast, slow, router


def test_model_in_demand_is_preloaded_on_a_faster_node_with_free_memory(make_fake, make_router):
    fast, slow, router = fast_and_slow(make_fake, make_router)
    for _ in range(3):
        assert chat(router, dict(CHAT, model="qwen2.5:7b")).headers["X-Herd-Node"] == "fast"
    for _ in range(3):
        assert chat(router).headers["X-Herd-Node"] == "slow"  # hot there; a cold load would be slower
    wait_for(lambda: any(path == "/api/generate" and "prompt" not in body for path, body in fast.received),
             timeout=5, what="preload sent to the fast node")
    wait_for(lambda: chat(router).headers["X-Herd-Node"] == "fast", timeout=5, what="served by fast")


def test_requests_queued_for_a_model_get_it_loaded_where_there_is_room(make_fake, make_router):
    # qwen2.5:7b is hot on `hot` only, one request at a time, 1 s each; `spare` is half as fast
    # and would keep less than a quarter of its 6 GB free with it (no second home by the usual
    # rule), and herd has timed no load, so its prior (3.25 s) keeps the queued requests waiting
    hot = make_fake(models={"qwen2.5:7b": 4.5}, loaded=["qwen2.5:7b"], token_delay=0.2)
    spare = make_fake(models={"qwen2.5:7b": 4.5, "qwen2.5:0.5b": 0.5}, loaded=["qwen2.5:0.5b"])
    hot.eval_duration_ns, spare.eval_duration_ns = 10_000_000, 2_500_000  # 2250 and 1000 GB/s
    router = make_router()
    router.herd.change_settings({"preload": True})
    heartbeat(router, "hot", hot, memory_budget_gb=32)
    heartbeat(router, "spare", spare, memory_budget_gb=6)
    router.wait_online(2)
    assert chat(router, dict(CHAT, model="qwen2.5:0.5b")).headers["X-Herd-Node"] == "spare"  # timed
    assert chat(router, dict(CHAT, model="qwen2.5:7b")).headers["X-Herd-Node"] == "hot"
    assert not any(path == "/api/generate" for path, _ in spare.received)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: chat(router, dict(CHAT, model="qwen2.5:7b")), range(3)))
    assert [r.status_code for r in replies] == [200] * 3
    assert any(path == "/api/generate" and "prompt" not in body and body["model"] == "qwen2.5:7b"
               for path, body in spare.received), "no load on spare while requests queued for hot"


def test_preload_setting_off_loads_nothing_ahead(make_fake, make_router):
    fast, slow, router = fast_and_slow(make_fake, make_router, preload=False)
    for model in ["qwen2.5:7b"] * 3 + ["llama3.2"] * 3:
        chat(router, dict(CHAT, model=model))
    time.sleep(2.5)
    assert not any(path == "/api/generate" and "prompt" not in body for path, body in fast.received)


def test_a_new_node_is_timed_once_on_its_smallest_chat_model(make_fake, make_router):
    fake = make_fake(models={"nomic-embed-text": 0.3, "llama3.2": 2.0, "qwen2.5:7b": 4.0},
                     loaded=["nomic-embed-text", "llama3.2", "qwen2.5:7b"], context_length=8192)
    fake.eval_duration_ns = 10_000_000  # 5 tokens in 10 ms
    router = make_router(nodes=[("a", fake.url)], calibrate=True)
    speed = wait_for(lambda: router.status()["nodes"][0]["decode_gbs"], what="node timed")
    assert abs(speed - 5 / 0.01 * 2.0) < 1  # tokens/s x GB of weights
    time.sleep(1.5)  # three more rounds of the warmer: a timed node is not timed again
    assert len(fake.received) == 1
    path, body = fake.received[0]
    assert path == "/api/generate" and body["model"] == "llama3.2:latest" and body["prompt"]
    assert body["options"] == {"num_predict": 32, "num_ctx": 8192}  # the context it runs with: no reload


def test_a_model_whose_running_context_is_unknown_is_never_timed(make_fake, make_router):
    fake = make_fake(loaded=["llama3.2"], context_length=8192)
    fake.reports_context = False  # an older Ollama: a guessed num_ctx could reload the model
    router = make_router(nodes=[("a", fake.url)], calibrate=True)
    time.sleep(1.5)  # three rounds of the warmer
    assert fake.received == [] and router.status()["nodes"][0]["decode_gbs"] is None


def test_a_node_running_models_in_system_ram_is_not_tried_before_gpu_nodes(make_fake, make_router):
    gpu = make_fake(loaded=["llama3.2"])
    cpu = make_fake(loaded=["llama3.2"])
    cpu.gpu = False  # /api/ps: size_vram 0, the model runs from system RAM
    for fake in (gpu, cpu):
        fake.eval_duration_ns = 10_000_000
    router = make_router(nodes=[("gpu", gpu.url), ("cpu", cpu.url)])
    assert [chat(router).headers["X-Herd-Node"] for _ in range(12)] == ["gpu"] * 12


@pytest.fixture
def two_model_node():
    """A simulated GPU node (400 GB/s) with two 2 GB models hot: 100 tokens take 0.5 s alone."""
    from sim_ollama import SimNode

    node = SimNode("gpu", memory_gb=24, bandwidth_gbs=400, models={"llama3.2": 2.0, "qwen2.5:7b": 2.0},
                   loaded=["llama3.2", "qwen2.5:7b"], scale=1.0).start()
    yield node
    node.stop()


def story(model, tokens):
    return {"model": model, "stream": False, "options": {"num_predict": tokens},
            "messages": [{"role": "user", "content": "tell me a story"}]}


def test_a_request_waits_for_another_model_to_finish_rather_than_share_the_node(make_router, two_model_node):
    node = two_model_node
    router = make_router(nodes=[("gpu", node.url)])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, router, story("llama3.2", 100))
        wait_for(lambda: node.instances["llama3.2:latest"].running, what="first request running")
        second = pool.submit(chat, router, story("qwen2.5:7b", 100))
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert node.stats["side_by_side"] == 0  # sharing would have made both finish late
    queued = dict(router.traces("SELECT model, queue_ms FROM request_traces"))
    assert queued["qwen2.5:7b"] > 100


def test_a_deferred_request_stops_waiting_when_the_other_model_runs_long(make_router, two_model_node):
    node = two_model_node
    router = make_router(nodes=[("gpu", node.url)], poll_interval=30)  # no report re-decides either
    # herd expects the long reply to be ~500 tokens (twice a usual reply); it runs to 2400 (12 s)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    first = pool.submit(chat, router, story("llama3.2", 2400))
    wait_for(lambda: node.instances["llama3.2:latest"].running, what="long request running")
    assert chat(router, story("qwen2.5:7b", 300)).status_code == 200  # deferred for a while, then beside it
    assert not first.done()
    queued = router.traces("SELECT queue_ms FROM request_traces WHERE model = 'qwen2.5:7b'")
    assert queued[0][0] > 0 and node.stats["side_by_side"] == 1
    pool.shutdown(wait=False)  # the long one ends when the router stops


# -- context switches ---------------------------------------------------------------------------

def test_a_burst_of_mixed_num_ctx_reloads_the_model_once(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=4, token_delay=0.05)
    router = make_router()
    heartbeat(router, "box", fake, num_parallel=4, default_context_length=4096)
    router.wait_online(1)
    large = ("/api/chat", dict(CHAT, options={"num_ctx": 16384}))
    plain, small = ("/api/chat", CHAT), ("/api/chat", dict(CHAT, options={"num_ctx": 2048}))
    burst = [large] + [plain, small, large, plain] * 3
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = []
        for path, body in burst:  # the large one first, the rest while it loads and runs
            futures.append(pool.submit(requests.post, router.url + path, json=body, timeout=30))
            time.sleep(0.01)
        assert [f.result().status_code for f in futures] == [200] * len(burst)
    # one reload, to 16384, and none back: every later request was sent to run at 16384 (one
    # sent at the old 4096 in between would make Ollama reload back, and forward again after)
    assert fake.reloads == 1
    sent = [body.get("options", {}).get("num_ctx") for _, body in fake.received]
    assert sent == [16384] * len(burst)


def test_a_second_large_context_request_goes_where_the_model_already_runs_large(make_fake, make_router):
    fakes = [make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=3, token_delay=0.05) for _ in range(2)]
    router = make_router()
    for name, fake in zip(("a", "b"), fakes):
        heartbeat(router, name, fake, num_parallel=2, default_context_length=4096)
    router.wait_online(2)
    large = dict(CHAT, options={"num_ctx": 16384})
    first = chat(router, large).headers["X-Herd-Node"]
    nodes = [chat(router, large).headers["X-Herd-Node"] for _ in range(4)]
    assert nodes == [first] * 4
    assert sum(f.reloads for f in fakes) == 1



def test_openai_requests_queued_for_want_of_the_default_context_get_it_restored(make_fake, make_router):
    # llama3.2 runs at 16384 on `a` after a large native request; /v1 requests cannot set num_ctx,
    # so each would reload it back there. They queue for `b` (one slot, 1.2 s a request) rather
    # than reload it one by one (5 s each by herd's prior: 1 s + 8 GB at 0.5 s/GB)
    a = make_fake(models={"llama3.2": 8.0}, loaded=["llama3.2"], tokens=4, token_delay=0.05)
    b = make_fake(models={"llama3.2": 8.0}, loaded=["llama3.2"], tokens=4, token_delay=0.3)
    a.eval_duration_ns, b.eval_duration_ns = 10_000_000, 100_000_000  # a is the faster, as herd learns
    router = make_router(poll_interval=30)  # no report of the reload: herd knows it from what it sent
    heartbeat(router, "a", a, num_parallel=2, default_context_length=4096)
    router.wait_online(1)
    assert chat(router, dict(CHAT, options={"num_ctx": 16384})).headers["X-Herd-Node"] == "a"
    heartbeat(router, "a", a, num_parallel=2, default_context_length=4096)  # it shows 16384 now
    heartbeat(router, "b", b, num_parallel=1, default_context_length=4096)
    router.wait_online(2)
    assert a.reloads == 1
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = [pool.submit(requests.post, router.url + "/v1/chat/completions", json=OPENAI_CHAT, timeout=30)
                   for _ in range(6)]
        # once they have waited as long as the reload takes, herd reloads it at the default itself,
        # and the requests still queued then are served there, with no report in between
        wait_for(lambda: ("/api/generate", {"model": "llama3.2:latest"}) in a.received, timeout=10,
                 what="a reload of llama3.2 at the default context on a")
        assert router.status()["nodes"][0]["models_loaded"][0]["context_length"] == 4096  # herd's own note
        wait_for(lambda: [path for path, _ in a.received][-1] == "/v1/chat/completions", timeout=10,
                 what="a queued /v1 request sent to a after the reload")
        assert [r.result().status_code for r in replies] == [200] * 6
    assert a.loaded["llama3.2:latest"] == 4096 and a.reloads == 2  # once there, once back


def test_a_model_herd_loaded_without_num_ctx_runs_at_the_default_the_node_then_shows(make_fake, make_router):
    # polled, no agent: herd guesses the default context (4096) when it sends the first request,
    # which loads the model at the node's real default, 32768
    fake = make_fake(models={"llama3.2": 2.0}, loaded=[], context_length=32768, tokens=20, token_delay=0.1)
    router = make_router(nodes=[("box", fake.url)])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(chat, router)  # runs 2 s
        wait_for(lambda: "llama3.2:latest" in fake.loaded, what="the model loading")
        time.sleep(0.6)  # a poll or two: /api/ps shows it at 32768 while it still runs
        large = chat(router, dict(CHAT, options={"num_ctx": 8192}))
        assert large.status_code == 200 and first.result().status_code == 200
    # 8192 fits what runs: sent without num_ctx (sent as 8192 it would reload the model down to it)
    assert fake.reloads == 0
    assert [body.get("options", {}).get("num_ctx") for _, body in fake.received] == [None, None]



def test_an_openai_request_that_loads_a_model_is_noted_at_once(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=[], tokens=20, token_delay=0.1)
    router = make_router(nodes=[("box", fake.url)], poll_interval=30)  # no report while it runs
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(requests.post, router.url + "/v1/chat/completions", json=OPENAI_CHAT, timeout=30)
        wait_for(lambda: "llama3.2:latest" in fake.loaded, what="the model loading")
        # herd sent the load: it counts the model as running there (at the node's default context),
        # as it does for the native API, rather than as cold until the next report
        assert router.status()["nodes"][0]["models_loaded"][0]["name"] == "llama3.2:latest"
        assert reply.result().status_code == 200


def test_an_openai_stream_that_loads_a_model_teaches_the_load_time(make_fake, make_router):
    # /v1 replies carry no load_duration: herd times the stream's first byte, which came after
    # the load and the prompt (the fake node takes 1.5 s to "load")
    fake = make_fake(models={"llama3.2": 2.0}, loaded=[])
    fake.first_byte_delay = 1.5
    router = make_router(nodes=[("box", fake.url)])
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="llama3.2", stream=True,
                                            messages=[{"role": "user", "content": "hello"}])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    # herd ends the exchange (and learns from it) once the stream's last bytes are sent: just after
    # the client has read them
    wait_for(lambda: router.herd.fleet.nodes["box"].loads, what="the load learnt")
    [(gb, seconds)] = router.herd.fleet.nodes["box"].loads
    assert gb == pytest.approx(2.0) and 1.4 < seconds < 2.5


# -- prompt caches ------------------------------------------------------------------------------

def conversation(turns, system="You are a careful assistant. " * 200):
    messages = [{"role": "system", "content": system}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"question {turn} " * 50})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": f"answer {turn} " * 80})
    return dict(CHAT, messages=messages)


def slow_fakes(make_fake, count):
    """Nodes that say they generate 50 tokens/s (so prompt seconds matter, as on real machines)."""
    fakes = [make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"]) for _ in range(count)]
    for fake in fakes:
        fake.eval_duration_ns = 100_000_000  # 5 tokens in 0.1 s
    return fakes


def test_follow_up_turns_go_where_their_conversation_is_cached(make_fake, make_router):
    fakes = slow_fakes(make_fake, 3)
    router = make_router(nodes=[(f"n{i}", f.url) for i, f in enumerate(fakes)])
    first = chat(router, conversation(1)).headers["X-Herd-Node"]
    assert [chat(router, conversation(turns)).headers["X-Herd-Node"] for turns in range(2, 8)] == [first] * 6


def test_a_shared_system_prompt_alone_does_not_pin_traffic_to_one_node(make_fake, make_router):
    # one-turn conversations that share only their system prompt, three at a time: the node
    # holding the prompt is busy, so the others take some and hold the prompt from then on
    fakes = slow_fakes(make_fake, 3)
    for fake in fakes:
        fake.token_delay = 0.1  # 5 tokens: about half a second, so the three of a wave overlap
    router = make_router(nodes=[(f"n{i}", f.url) for i, f in enumerate(fakes)])
    counts = collections.Counter()

    def ask(user):
        body = conversation(1)
        body["messages"][1]["content"] = f"user {user} asks something else entirely " * 30
        return chat(router, body).headers["X-Herd-Node"]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for wave in range(10):
            counts.update(pool.map(ask, range(wave * 3, wave * 3 + 3)))
    assert set(counts) == {"n0", "n1", "n2"} and min(counts.values()) >= 5, counts


def test_a_failed_attempt_leaves_the_slot_as_it_was(make_fake, make_router):
    # each node answers 500 once, so the request is served on its third attempt: the two failed
    # attempts leave their slots as they were, and only the node that served it holds the prompt
    fakes = slow_fakes(make_fake, 2)
    router = make_router(nodes=[(f"n{i}", f.url) for i, f in enumerate(fakes)])
    fakes[0].fail_next(1, status=500)
    fakes[1].fail_next(1, status=500)
    served = chat(router, conversation(1))
    assert served.status_code == 200
    held = {node["node_id"]: sum(m["conversations"] for m in node["models_loaded"])
            for node in requests.get(router.url + "/fleet/status", timeout=5).json()["nodes"]}
    assert sorted(held.values()) == [0, 1] and held[served.headers["X-Herd-Node"]] == 1, held


@pytest.mark.parametrize("parallel", [1, 4], ids=["its one slot overdue", "a free slot beside it"])
def test_a_node_holding_a_request_back_gets_no_more_of_that_model(make_fake, make_router, parallel):
    fast = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    slow = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    fast.eval_duration_ns = 10_000_000  # 5 tokens in 10 ms
    slow.eval_duration_ns = 100_000_000  # 5 tokens in 100 ms
    router = make_router()
    heartbeat(router, "fast", fast, num_parallel=parallel)
    heartbeat(router, "slow", slow, num_parallel=parallel)
    router.wait_online(2)
    for _ in range(40):  # until both speeds are learnt (an unmeasured node ties with the slowest measured)
        chat(router)
        if all(node["decode_gbs"] for node in router.status()["nodes"]):
            break
    assert chat(router).headers["X-Herd-Node"] == "fast"
    fast.first_byte_delay = 3.0  # the next request there is held back, as behind a load
    sent = len(fast.received)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(chat, router)
        wait_for(lambda: len(fast.received) > sent, what="the held request at the fast node")
        fast.first_byte_delay = 0.0
        time.sleep(0.6)  # many times what herd expects a reply there to take
        started = time.monotonic()
        assert chat(router).headers["X-Herd-Node"] == "slow"
        assert time.monotonic() - started < 1.5  # not queued behind the held request
        assert held.result().headers["X-Herd-Node"] == "fast"

"""Faults on fake nodes over loopback: hangs, deaths, disconnects, stalls, fallbacks, pulls."""

import concurrent.futures
import json
import random
import socket
import time

import pytest
import requests

import herd

from conftest import CHAT, OPENAI_CHAT, chat, heartbeat, wait_for


def events(router):
    return [json.loads(row[0]) if row[0] else [] for row in
            router.traces("SELECT events FROM request_traces ORDER BY timestamp")]


def node_status(router, node_id):
    return next(n for n in router.status()["nodes"] if n["node_id"] == node_id)


def raw_stream_request(router, body, path="/api/chat"):
    """Open a streaming request on a bare socket, so the test can hang up whenever it likes."""
    sock = socket.create_connection(("127.0.0.1", int(router.url.rsplit(":", 1)[1])))
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return sock


# -- hangs, deaths, failures ----------------------------------------------------------------

def test_node_hanging_before_first_byte_is_cut_and_retried_elsewhere(make_fake, make_router):
    hung = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    good = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("hung", hung.url), ("good", good.url)], first_byte_timeout=0.5)
    hung.first_byte_delay = 5  # its /api/tags still answers: only request outcomes show the hang
    started = time.monotonic()
    response = requests.post(router.url + "/api/chat", json=dict(CHAT, stream=True), timeout=10)
    assert response.status_code == 200 and response.headers["X-Herd-Node"] == "good"
    assert time.monotonic() - started < 2.5
    (event,) = events(router)[0]
    assert event["failed"] == "hung" and "first-byte timeout" in event["reason"]
    hung_status = [n for n in router.status()["nodes"] if n["node_id"] == "hung"][0]
    assert hung_status["status"] == "degraded" and hung_status["cooling_down_s"] > 0
    quick = time.monotonic()
    assert chat(router).headers["X-Herd-Node"] == "good"  # the hung node rests: no second wait
    assert time.monotonic() - quick < 0.5


def test_with_no_queue_a_failed_attempt_is_reported_as_such_and_a_busy_fleet_as_busy(make_fake, make_router):
    # --max-queue 0: a retry finds the only node resting and cannot wait; the client must hear
    # what failed (the node's silence), not that a queue of zero was full
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=3, token_delay=0.3)
    router = make_router(nodes=[("only", fake.url)], first_byte_timeout=0.5, max_queue=0)
    fake.first_byte_delay = 5
    reply = requests.post(router.url + "/api/chat", json=dict(CHAT, stream=True), timeout=10)
    assert reply.status_code == 504 and "first-byte timeout" in reply.json()["error"], reply.text
    assert "recovered" not in reply.json()["error"]  # herd did not wait for it to
    resting = chat(router)  # the node rests (1 s at first): nothing is busy, and nothing may wait
    assert resting.status_code == 503 and "resting after failing" in resting.json()["error"], resting.text
    fake.first_byte_delay = 0
    wait_for(lambda: chat(router).status_code == 200, timeout=15, what="the node back from its rest")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(chat, router)
        wait_for(lambda: fake.active.get("llama3.2:latest"), what="a request running")
        busy = chat(router)
        assert busy.status_code == 503 and "--max-queue 0" in busy.json()["error"], busy.text
        assert running.result().status_code == 200


def test_with_no_queue_a_node_that_is_only_busy_is_not_reported_as_failed(make_fake, make_router):
    one, other = (make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=3, token_delay=0.4)
                  for _ in range(2))
    router = make_router(nodes=[("one", one.url), ("other", other.url)], max_queue=0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(chat, router)
        wait_for(lambda: one.active.get("llama3.2:latest") or other.active.get("llama3.2:latest"),
                 what="a request running")
        failing = other if one.active.get("llama3.2:latest") else one  # the free one fails the next
        failing.fail_next(1, status=500)
        reply = chat(router)  # tried on the free node, which fails; the other is busy
        assert reply.status_code == 503 and "is busy" in reply.json()["error"], reply.text
        assert running.result().status_code == 200


def test_request_waits_for_a_failing_node_to_recover_instead_of_failing(make_fake, make_router):
    only = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("only", only.url)])
    only.fail_next(1, status=500)
    response = chat(router)
    assert response.status_code == 200  # retried on the same node once its short rest ended
    assert router.traces("SELECT retry_count, status FROM request_traces") == [(1, "completed")]


def test_a_request_the_node_keeps_hanging_up_on_while_serving_others_is_given_up(make_fake, make_router):
    # a prompt that crashes the runner: the node hangs up on it (no status line) and serves
    # everyone else. herd tries again once it has seen the node serve others, then answers 502,
    # rather than retry until its queue timeout while every retry rests the node for the others
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    fake.drop_prompts = {"POISON"}
    router = make_router(nodes=[("only", fake.url)], queue_timeout=60)
    stop = time.monotonic() + 60
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        poison = pool.submit(requests.post, router.url + "/api/chat", timeout=90,
                             json=dict(CHAT, messages=[{"role": "user", "content": "POISON"}]))
        while not poison.done() and time.monotonic() < stop:
            assert chat(router).status_code == 200  # the others are served meanwhile
        response = poison.result()
    assert response.status_code == 502
    tries = sum(1 for _, body in fake.received if body["messages"][-1]["content"] == "POISON")
    assert 2 <= tries <= 3
    assert router.traces("SELECT status FROM request_traces WHERE retry_count > 0") == [("failed",)]


def test_node_killed_during_concurrent_requests_loses_none_that_had_not_streamed(make_fake, make_router):
    victim = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=20, token_delay=0.05)
    others = [make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=20, token_delay=0.05)
              for _ in range(2)]
    router = make_router(nodes=[("victim", victim.url), ("b", others[0].url), ("c", others[1].url)],
                         parallel=4, poll_interval=30)

    def one(index):
        stream = index % 2 == 0
        response = requests.post(router.url + "/api/chat", json=dict(CHAT, stream=stream), timeout=30)
        if not stream:
            return ("whole", response.status_code, response.headers.get("X-Herd-Node"))
        last = [json.loads(line) for line in response.text.splitlines() if line][-1]
        return ("stream", response.status_code, "error" in last)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(one, i) for i in range(48)]
        wait_for(lambda: victim.active.get("llama3.2:latest", 0) >= 2, what="victim busy")
        victim.die_after_chunks = 0  # everything it is running now breaks
        victim.stop()  # and new connections are refused
        results = [f.result() for f in futures]
    whole = [r for r in results if r[0] == "whole"]
    assert all(status == 200 for _, status, _ in whole)  # nothing sent yet: retried invisibly
    broken_streams = [r for r in results if r[0] == "stream" and r[2]]
    assert all(r[1] == 200 for r in results)
    rows = router.traces("SELECT status, COUNT(*) FROM request_traces GROUP BY status")
    counts = dict(rows)
    assert sum(counts.values()) == 48
    assert counts.get("incomplete", 0) == len(broken_streams)
    assert counts["completed"] == 48 - len(broken_streams)


# -- disconnects and the reaper ---------------------------------------------------------------

MIXED = [("/api/chat", dict(CHAT, stream=True)), ("/api/chat", CHAT),
         ("/api/generate", {"model": "llama3.2", "prompt": "hi"}),
         ("/api/embed", {"model": "llama3.2", "input": ["a", "b"]}),
         ("/v1/chat/completions", dict(OPENAI_CHAT, stream=True)), ("/v1/chat/completions", OPENAI_CHAT)]


def finished_well(response):
    """200, and a stream that ended as its API ends one (no error chunk)."""
    text = response.text
    return response.status_code == 200 and '"error"' not in text and (
        "[DONE]" in text or '"done": true' in text or '"done":true' in text or "embeddings" in text
        or not response.headers.get("Content-Type", "").startswith(("text/event-stream", "application/x-ndjson")))


@pytest.mark.parametrize("seed", range(1, 11))
def test_every_node_failing_at_once_loses_no_request_while_one_recovers(make_fake, make_router, seed):
    rng = random.Random(seed)
    fakes = [make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=3, token_delay=0.003)
             for _ in range(3)]
    router = make_router(nodes=[(f"n{i}", f.url) for i, f in enumerate(fakes)], first_byte_timeout=1.0,
                         poll_interval=0.5)  # a slow poll under load must not take a node offline
    erroring, refusing, dying = fakes
    port = refusing.port
    erroring.fail_next(rng.randint(10, 20), status=500)  # answers 500, then recovers
    refusing.stop()  # connection refused until it restarts
    dying.die_after_chunks = 0  # drops every connection before its first byte
    restart_at, mend_at = rng.uniform(0.5, 1.5), rng.uniform(1.0, 2.5)

    def recover_one_by_one():
        time.sleep(restart_at)
        fakes[1] = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=3, port=port)
        time.sleep(max(0.0, mend_at - restart_at))
        dying.die_after_chunks = None

    start, offsets = time.monotonic(), sorted(rng.uniform(0, 2.0) for _ in range(200))

    def send(index):  # 200 requests spread over the first two seconds
        time.sleep(max(0.0, start + offsets[index] - time.monotonic()))
        path, body = MIXED[index % len(MIXED)]
        return requests.post(router.url + path, json=body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        pool.submit(recover_one_by_one)
        responses = list(pool.map(send, range(200)))
    bad = [(r.status_code, r.text[:200]) for r in responses if not finished_well(r)]
    assert bad == []
    assert router.traces("SELECT status, COUNT(*) FROM request_traces GROUP BY status") == [("completed", 200)]


def test_client_leaving_during_a_silent_load_frees_the_slot_within_a_second(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("a", fake.url)])
    fake.first_byte_delay = 5  # a cold load: Ollama says nothing for seconds
    sock = raw_stream_request(router, dict(CHAT, stream=True))
    wait_for(lambda: router.status()["fleet"]["requests_active"] == 1, what="request running")
    sock.close()
    left = time.monotonic()
    wait_for(lambda: router.status()["fleet"]["requests_active"] == 0, timeout=3, what="slot freed")
    assert time.monotonic() - left < 1.0
    fake.first_byte_delay = 0
    assert chat(router).status_code == 200
    statuses = [r[0] for r in router.traces("SELECT status FROM request_traces ORDER BY timestamp")]
    assert statuses == ["cancelled", "completed"]


def test_client_leaving_while_queued_leaves_the_queue(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=3, token_delay=0.5)
    router = make_router(nodes=[("a", fake.url)])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(chat, router)
        wait_for(lambda: fake.active.get("llama3.2:latest"), what="first running")
        sock = raw_stream_request(router, dict(CHAT, stream=True))
        wait_for(lambda: router.status()["fleet"]["requests_queued"] == 1, what="queued")
        sock.close()
        wait_for(lambda: router.status()["fleet"]["requests_queued"] == 0, timeout=2, what="left queue")
        assert running.result().status_code == 200
    assert ("cancelled",) in router.traces("SELECT status FROM request_traces")
    assert len(fake.received) == 1  # the one that left never reached the node


def test_stalled_stream_is_reaped_and_its_slot_freed(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=6)
    router = make_router(nodes=[("a", fake.url)], stall_timeout=0.6, idle_timeout=30)
    fake.stall_after_chunks = (2, 5)
    started = time.monotonic()
    response = requests.post(router.url + "/api/chat", json=dict(CHAT, stream=True), timeout=10)
    parts = [json.loads(line) for line in response.text.splitlines() if line]
    assert time.monotonic() - started < 2.5
    assert len(parts) == 3 and "reaped" in parts[-1]["error"]
    assert router.traces("SELECT status FROM request_traces") == [("reaped",)]
    assert router.status()["fleet"]["requests_active"] == 0


def test_idle_gap_mid_stream_ends_the_stream_with_an_error_chunk(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=6)
    router = make_router(nodes=[("a", fake.url)], idle_timeout=0.5)
    fake.stall_after_chunks = (3, 5)
    response = requests.post(router.url + "/v1/chat/completions", json=dict(OPENAI_CHAT, stream=True), timeout=10)
    last = json.loads(response.text.strip().split("\n\n")[-1].removeprefix("data: "))
    assert "idle timeout" in last["error"]["message"]
    assert router.traces("SELECT status FROM request_traces") == [("incomplete",)]


def test_in_flight_counts_are_reconciled_with_running_requests(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("a", fake.url)])
    fleet = router.herd.fleet
    with fleet.lock:  # simulate a count that drifted (a bug, a lost release)
        fleet.nodes["a"].hold(herd.Lease(node_id="a", url=fake.url, model="llama3.2:latest", score=0,
                                         breakdown={}, eta_s=1.0, started=time.monotonic()))
    assert router.status()["nodes"][0]["requests_active"] == 1
    router.herd.watchdog.reconcile()
    router.herd.watchdog.reconcile()
    assert router.status()["nodes"][0]["requests_active"] == 0
    assert chat(router).status_code == 200


# -- fallbacks --------------------------------------------------------------------------------

def test_fallback_chain_with_primary_missing_everywhere_on_both_apis(make_fake, make_router):
    fake = make_fake(models={"qwen2.5:7b": 4.0, "phi4": 8.0})
    router = make_router(nodes=[("a", fake.url)])
    router.herd.change_settings({"auto_pull": False})
    body = dict(CHAT, model="llama3.2", fallback_models=["mistral", "phi4", "qwen2.5:7b"])
    ollama = chat(router, body)
    assert ollama.status_code == 200 and ollama.headers["X-Herd-Model"] == "phi4:latest"
    openai = requests.post(router.url + "/v1/chat/completions",
                           json=dict(OPENAI_CHAT, model="gone", fallback_models=["qwen2.5:7b"]))
    assert openai.status_code == 200 and openai.headers["X-Herd-Model"] == "qwen2.5:7b"
    assert openai.json()["model"] == "qwen2.5:7b"
    rows = router.traces("SELECT model, original_model, fallback_used FROM request_traces ORDER BY timestamp")
    assert rows == [("phi4:latest", "llama3.2:latest", 1), ("qwen2.5:7b", "gone:latest", 1)]
    none = chat(router, dict(CHAT, model="x", fallback_models=["y"]))
    assert none.status_code == 404


def test_fallback_model_is_used_when_every_node_of_the_primary_fails(make_fake, make_router):
    primary = make_fake(models={"llama3.2": 2.0})
    other = make_fake(models={"qwen2.5:7b": 4.0})
    router = make_router(nodes=[("p", primary.url), ("o", other.url)])
    primary.fail_next(5, status=500)
    response = chat(router, dict(CHAT, fallback_models=["qwen2.5:7b"]))
    assert response.status_code == 200 and response.headers["X-Herd-Model"] == "qwen2.5:7b"


def vram_fleet(make_fake, make_router):
    fake = make_fake(models={"llama3.3:70b": 40.0, "llama3.2": 2.0, "llava:7b": 4.5, "nomic-embed-text": 0.3},
                     loaded=["llama3.2", "llava:7b", "nomic-embed-text"],
                     capabilities={"llama3.2": ["completion", "tools"], "llava:7b": ["completion", "vision"],
                                   "nomic-embed-text": ["embedding"], "llama3.3:70b": ["completion", "tools"]})
    router = make_router()
    heartbeat(router, "small", fake, memory_budget_gb=16)
    router.wait_online(1)
    return fake, router


def test_vram_fallback_serves_a_loaded_model_of_the_same_kind(make_fake, make_router):
    fake, router = vram_fleet(make_fake, make_router)
    plain = chat(router, dict(CHAT, model="llama3.3:70b"))
    assert plain.status_code == 200 and plain.headers["X-Herd-Model"] == "llava:7b"  # largest able
    tools = chat(router, dict(CHAT, model="llama3.3:70b", tools=[{"type": "function", "function": {"name": "f"}}]))
    assert tools.headers["X-Herd-Model"] == "llama3.2:latest"
    images = chat(router, dict(CHAT, model="llama3.3:70b",
                               messages=[{"role": "user", "content": "what is this", "images": ["aGk="]}]))
    assert images.headers["X-Herd-Model"] == "llava:7b"
    rows = router.traces("SELECT fallback_used, events FROM request_traces")
    assert all(used == 1 and "vram_fallback" in ev for used, ev in rows)


def test_vram_fallback_never_crosses_capabilities(make_fake, make_router):
    fake, router = vram_fleet(make_fake, make_router)
    both = chat(router, dict(CHAT, model="llama3.3:70b", tools=[{"type": "function"}],
                             messages=[{"role": "user", "content": "x", "images": ["aGk="]}]))
    assert both.status_code == 507 and "no loaded model of the same kind" in both.json()["error"]
    openai_image = requests.post(router.url + "/v1/chat/completions", json={
        "model": "llama3.3:70b", "tools": [{"type": "function", "function": {"name": "f"}}],
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert openai_image.status_code == 507
    assert not any(body.get("model") == "nomic-embed-text:latest" for _, body in fake.received)


def test_vram_fallback_off_gives_507(make_fake, make_router):
    fake, router = vram_fleet(make_fake, make_router)
    assert requests.post(router.url + "/dashboard/api/settings", json={"vram_fallback": False}).json()[
        "vram_fallback"] is False
    response = chat(router, dict(CHAT, model="llama3.3:70b"))
    assert response.status_code == 507 and "does not fit" in response.json()["error"]


# -- context protection -----------------------------------------------------------------------

def ctx_request(router, num_ctx=None, api="ollama"):
    if api == "openai":
        return requests.post(router.url + "/v1/chat/completions", json=OPENAI_CHAT, timeout=10)
    body = dict(CHAT)
    if num_ctx is not None:
        body["options"] = {"num_ctx": num_ctx, "temperature": 0.2}
    return chat(router, body)


def test_num_ctx_at_or_below_the_loaded_default_context_is_stripped(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], context_length=4096)
    router = make_router(nodes=[("a", fake.url)])
    # before herd has seen the node's default, it sends the context the model runs with
    assert ctx_request(router, 2048).status_code == 200 and fake.received[-1][1]["options"]["num_ctx"] == 4096
    assert ctx_request(router, None).status_code == 200 and fake.received[-1][1]["options"]["num_ctx"] == 4096
    assert node_status(router, "a")["default_context"] == "guessed"
    # a /v1 request runs with the default, so the next /api/ps shows it
    assert ctx_request(router, api="openai").status_code == 200
    wait_for(lambda: node_status(router, "a")["default_context"] == "seen", what="the default seen")
    for asked in (2048, 4096):
        assert ctx_request(router, asked).status_code == 200
        options = fake.received[-1][1]["options"]
        assert "num_ctx" not in options and options["temperature"] == 0.2
        assert "stripped" in events(router)[-1][0]["context"]


def test_a_node_running_every_model_at_a_large_context_keeps_its_openai_traffic(make_fake, make_router):
    # recent Ollama loads models with 32k or 256k on a machine with lots of VRAM, unless told otherwise
    studio = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.7, "nomic-embed-text": 0.3},
                       loaded=["llama3.2", "qwen2.5:7b", "nomic-embed-text"], context_length=32768)
    studio.loaded["nomic-embed-text:latest"] = 2048  # Ollama caps the default at what it was trained for
    small = make_fake(models={"llama3.2": 2.0})  # would have to load it
    router = make_router(nodes=[("studio", studio.url), ("small", small.url)])
    assert node_status(router, "studio")["default_context_length"] == 32768
    # a /v1 embedding runs with the default, so /api/ps shows the embedding model's own (capped) one
    assert requests.post(router.url + "/v1/embeddings", json={"model": "nomic-embed-text", "input": "hi"},
                         timeout=10).status_code == 200
    wait_for(lambda: node_status(router, "studio")["default_context"] == "seen", what="a default seen")
    assert node_status(router, "studio")["default_context_length"] == 32768
    assert {ctx_request(router, api="openai").headers["X-Herd-Node"] for _ in range(6)} == {"studio"}
    assert small.received == []


def test_num_ctx_below_a_non_default_loaded_context_is_raised_to_it(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], context_length=8192)
    router = make_router(nodes=[("a", fake.url)])
    ctx_request(router, 2048)
    assert fake.received[-1][1]["options"]["num_ctx"] == 8192
    ctx_request(router, 8192)
    assert fake.received[-1][1]["options"]["num_ctx"] == 8192
    ctx_request(router, None)  # leaving it out would reload to the default: send what runs
    assert fake.received[-1][1]["options"]["num_ctx"] == 8192


def test_num_ctx_above_prefers_a_node_loaded_with_enough_else_passes_through(make_fake, make_router):
    small = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], context_length=4096)
    large = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], context_length=32768)
    router = make_router(nodes=[("small", small.url), ("large", large.url)])
    for _ in range(5):
        assert ctx_request(router, 16384).headers["X-Herd-Node"] == "large"
    assert large.received[-1][1]["options"]["num_ctx"] == 32768
    too_big = ctx_request(router, 65536)
    node = too_big.headers["X-Herd-Node"]
    sent = (large if node == "large" else small).received[-1][1]["options"]["num_ctx"]
    assert sent == 65536 and "passed through" in events(router)[-1][0]["context"]


def test_openai_requests_prefer_nodes_running_the_default_context(make_fake, make_router):
    custom = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.7, "phi3": 2.2},
                       loaded=["llama3.2", "qwen2.5:7b", "phi3"], context_length=4096)
    custom.loaded["llama3.2:latest"] = 8192  # a client loaded it with num_ctx 8192
    default = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], context_length=4096)
    router = make_router(nodes=[("custom", custom.url), ("default", default.url)])
    assert node_status(router, "custom")["default_context_length"] == 4096  # what most models run with
    assert {ctx_request(router, api="openai").headers["X-Herd-Node"] for _ in range(8)} == {"default"}
    # native requests run on either (herd sends the running context); equal nodes share at random
    assert {ctx_request(router, None).headers["X-Herd-Node"] for _ in range(24)} == {"custom", "default"}


def test_warn_and_passthrough_leave_num_ctx_alone(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("a", fake.url)], context_protection="warn")
    ctx_request(router, 2048)
    assert fake.received[-1][1]["options"]["num_ctx"] == 2048
    assert events(router)[-1][0]["context"].startswith("warn:")
    router.herd.change_settings({"context_protection": "passthrough"})
    ctx_request(router, 1024)
    assert fake.received[-1][1]["options"]["num_ctx"] == 1024 and events(router)[-1] == []


def test_other_reload_options_are_held_to_what_the_model_was_loaded_with(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0})  # cold: herd loads it and remembers how
    router = make_router(nodes=[("a", fake.url)])
    chat(router, dict(CHAT, options={"num_thread": 8, "num_batch": 256}))
    assert fake.received[-1][1]["options"] == {"num_thread": 8, "num_batch": 256}
    chat(router, dict(CHAT, options={"num_thread": 4, "num_gpu": 99, "use_mmap": False}))
    assert fake.received[-1][1]["options"] == {"num_thread": 8, "num_batch": 256}


# -- auto-pull --------------------------------------------------------------------------------

def test_auto_pull_starts_one_pull_onto_the_roomiest_node_and_says_where(make_fake, make_router):
    roomy = make_fake(models={"llama3.2": 2.0}, token_delay=0.2)
    tight = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    roomy.pull_steps = 5
    router = make_router()
    heartbeat(router, "roomy", roomy, memory_budget_gb=64, interval_s=0.2)
    heartbeat(router, "tight", tight, memory_budget_gb=8, interval_s=0.2)
    first = chat(router, dict(CHAT, model="phi4"))
    assert first.status_code == 404
    message = first.json()["error"]
    assert "started pulling it onto roomy" in message and "/dashboard/api/model-management" in message
    second = chat(router, dict(CHAT, model="phi4"))
    assert "herd is pulling it onto roomy" in second.json()["error"]  # one pull per model
    progress = requests.get(router.url + "/dashboard/api/model-management").json()["pulls"]
    assert [(p["model"], p["node_id"]) for p in progress] == [("phi4:latest", "roomy")]
    wait_for(lambda: requests.get(router.url + "/dashboard/api/model-management").json()["pulls"][0][
        "status"] == "success", timeout=5, what="pull finished")
    assert "phi4:latest" in roomy.models and "phi4:latest" not in tight.models
    heartbeat(router, "roomy", roomy, memory_budget_gb=64)
    assert chat(router, dict(CHAT, model="phi4")).status_code == 200
    assert any("auto_pull" in e for ev in events(router) for e in ev)


def test_auto_pulls_are_capped_and_a_failed_one_is_not_tried_again_at_once(make_fake, make_router):
    # typos in model names must not start a pull each: four run at once at most, a name the
    # registry does not have is not pulled again for a while, and the list stays bounded
    fake = make_fake(models={"llama3.2": 2.0}, token_delay=0.5)
    fake.pull_steps, fake.unpullable = 20, {"typo:latest"}
    router = make_router(nodes=[("a", fake.url)])
    assert "started pulling" in chat(router, dict(CHAT, model="typo")).json()["error"]
    wait_for(lambda: router.herd.pulls.snapshot()[0]["status"] == "failed", what="the pull failing")
    again = chat(router, dict(CHAT, model="typo")).json()["error"]
    assert "pull of it onto a failed (pull model manifest: file does not exist)" in again
    for k in range(4):
        assert "started pulling" in chat(router, dict(CHAT, model=f"model{k}")).json()["error"]
    refused = chat(router, dict(CHAT, model="model4")).json()["error"]
    assert "herd is pulling 4 models already (at most 4 at once)" in refused
    assert sorted(p["model"] for p in router.herd.pulls.snapshot()) == [
        "model0:latest", "model1:latest", "model2:latest", "model3:latest", "typo:latest"]
    pulls = router.herd.pulls
    for k in range(herd.PULLS_KEPT + 10):  # ended pulls beyond PULLS_KEPT are forgotten, oldest first
        pulls.pulls[f"old{k}"] = {"model": f"old{k}", "status": "success"}
    pulls.pulls.pop("model3:latest")["status"] = "success"  # (as if it had ended)
    assert pulls.start("model9", "a", fake.url) is None
    ended = [name for name, p in pulls.pulls.items() if p["status"] in ("success", "failed")]
    assert len(ended) == herd.PULLS_KEPT and "typo:latest" not in ended and "old109" in ended


def test_auto_pull_off_gives_a_plain_404(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("a", fake.url)])
    requests.post(router.url + "/dashboard/api/settings", json={"auto_pull": False})
    response = chat(router, dict(CHAT, model="phi4"))
    assert response.status_code == 404 and "pulling" not in response.json()["error"]
    assert "phi4:latest" not in fake.models


def test_settings_reject_unknown_keys_and_bad_values(make_router):
    router = make_router(calibrate=True)
    bad = requests.post(router.url + "/dashboard/api/settings", json={"colour": "red"})
    assert bad.status_code == 400 and "unknown setting" in bad.json()["error"]
    bad = requests.post(router.url + "/dashboard/api/settings", json={"context_protection": "always"})
    assert bad.status_code == 400
    assert requests.get(router.url + "/dashboard/api/settings").json() == {
        "auto_pull": True, "vram_fallback": True, "context_protection": "strip", "preload": True,
        "calibrate": True, "prompt_affinity": True}


def test_retry_after_a_fallback_attempt_sends_the_primary_name_again(make_fake, make_router):
    both = make_fake(models={"qwen2.5:7b": 4.0})
    primary = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("q", both.url), ("p", primary.url)])
    primary.fail_next(1, status=500)  # primary fails, so the fallback serves
    response = chat(router, dict(CHAT, fallback_models=["qwen2.5:7b"]))
    assert response.headers["X-Herd-Model"] == "qwen2.5:7b"
    assert both.received[-1][1]["model"] == "qwen2.5:7b"
    time.sleep(1.1)  # the primary's rest ends
    assert chat(router, dict(CHAT, fallback_models=["qwen2.5:7b"])).headers["X-Herd-Model"] == "llama3.2:latest"
    assert primary.received[-1][1]["model"] == "llama3.2"


def test_num_ctx_written_as_a_float_is_protected_too(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], context_length=8192)
    router = make_router(nodes=[("a", fake.url)])
    chat(router, dict(CHAT, options={"num_ctx": 2048.0}))
    assert fake.received[-1][1]["options"]["num_ctx"] == 8192


def test_an_agent_saying_its_ollama_answers_does_not_end_the_rest_herd_gave_it(make_fake, make_router):
    # The agent reaches its Ollama on loopback; herd's connections are refused (Ollama listens on
    # 127.0.0.1 only, here: a port nobody listens on). Heartbeats every 0.1 s used to end the
    # node's rest each time, so a request waiting 3 s for its model was tried there ~30 times;
    # the rests now grow (1 s, 2 s): at most 3 tries, then the queue timeout's answer
    fake = make_fake(models={"only-here": 2.0}, loaded=["only-here"])
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    router = make_router(queue_timeout=3.0)
    assert heartbeat(router, "lo", fake, ollama_url=refused_url).status_code == 200
    done = []

    def keep_beating():
        beats = 0
        while not done:
            assert heartbeat(router, "lo", fake, ollama_url=refused_url).status_code == 200
            beats += 1
            time.sleep(0.1)
        return beats

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        beating = pool.submit(keep_beating)
        try:
            answer = chat(router, dict(CHAT, model="only-here"))
        finally:
            done.append(True)
    assert beating.result() >= 20
    assert answer.status_code in (502, 503) and "refused" in answer.json()["error"]
    (retries,), = router.traces("SELECT retry_count FROM request_traces")
    assert retries <= 2


def test_an_agent_reporting_its_ollama_back_ends_the_rest():
    # Ollama restarted: herd's request was refused (a rest), the agent reported it down, then up
    fleet = herd.Fleet(herd.Config())
    entry = {"name": "m:latest", "model": "m:latest", "size": 1}
    up = {"ollama": {"reachable": True, "models": [entry], "loaded": []}}
    fleet.report("n", "http://127.0.0.1:9", "agent", 5.0, up)
    fleet.note_failure(herd.Lease(node_id="n", url="http://127.0.0.1:9", model="m:latest", score=0, breakdown={}),
                       "n: connection refused", unreachable=True)
    fleet.report("n", "http://127.0.0.1:9", "agent", 5.0, up)
    assert fleet.nodes["n"].cooldown_until > 0  # up all along: says nothing of herd's connections
    fleet.report("n", "http://127.0.0.1:9", "agent", 5.0, {"ollama": {"reachable": False, "error": "refused"}})
    fleet.report("n", "http://127.0.0.1:9", "agent", 5.0, up)
    assert fleet.nodes["n"].cooldown_until == 0.0 and fleet.nodes["n"].failures == 0

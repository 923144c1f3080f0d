"""Proxying: streaming, retries before the first byte, errors in each API's shape, traces."""

import concurrent.futures
import json
import socket
import time

import requests

import herd
from conftest import CHAT, OPENAI_CHAT, chat, wait_for


def lines(response):
    return [json.loads(line) for line in response.iter_lines() if line]


def test_stream_is_relayed_chunk_by_chunk_not_buffered(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=4, token_delay=0.25)
    router = make_router(nodes=[("a", fake.url)])
    started = time.monotonic()
    response = requests.post(router.url + "/api/chat", json=dict(CHAT, stream=True), stream=True, timeout=10)
    assert response.headers["X-Accel-Buffering"] == "no"
    arrivals = []
    for line in response.iter_lines():
        arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 5
    assert arrivals[0] < 0.2  # first token long before the reply ends (0.75 s)
    assert arrivals[-1] > 0.7


def test_retries_on_next_node_when_first_refuses_connections(make_fake, make_router):
    dead = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    alive = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("dead", dead.url), ("alive", alive.url)], poll_interval=30)
    dead.stop()  # still online in herd's eyes: the next poll is 30 s away
    response = chat(router)
    assert response.status_code == 200 and response.headers["X-Herd-Node"] == "alive"
    rows = router.traces("SELECT node_id, retry_count, status FROM request_traces")
    assert rows == [("alive", 1, "completed")]


def test_retries_on_next_node_when_first_answers_500(make_fake, make_router):
    flaky = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    good = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("flaky", flaky.url), ("good", good.url)])
    flaky.fail_next(1, status=500)
    streamed = requests.post(router.url + "/api/chat", json=dict(CHAT, stream=True), timeout=10)
    assert streamed.status_code == 200 and streamed.headers["X-Herd-Node"] == "good"
    assert lines(streamed)[-1]["done"] is True


def test_node_dying_before_first_byte_of_a_stream_is_retried(make_fake, make_router):
    broken = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    good = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("broken", broken.url), ("good", good.url)])
    broken.die_after_chunks = 0
    response = requests.post(router.url + "/v1/chat/completions", json=dict(OPENAI_CHAT, stream=True), timeout=10)
    assert response.status_code == 200 and response.headers["X-Herd-Node"] == "good"
    assert response.text.rstrip().endswith("data: [DONE]")


def test_every_node_failing_at_once_waits_for_the_first_to_recover(make_fake, make_router):
    fakes = [make_fake(models={"llama3.2": 2.0}) for _ in range(3)]
    router = make_router(nodes=[(f"n{i}", f.url) for i, f in enumerate(fakes)])
    for fake in fakes:
        fake.fail_next(1, status=503)
    response = chat(router)
    assert response.status_code == 200  # three nodes failed; the first back from its rest served it
    (retries, status), = router.traces("SELECT retry_count, status FROM request_traces")
    assert (retries, status) == (3, "completed")


def test_every_node_failing_for_good_gives_a_json_error_not_a_stack_trace(make_fake, make_router):
    fakes = [make_fake(models={"llama3.2": 2.0}) for _ in range(3)]
    router = make_router(nodes=[(f"n{i}", f.url) for i, f in enumerate(fakes)], queue_timeout=2)
    for fake in fakes:
        fake.fail_next(100, status=503)
    response = chat(router)
    assert response.status_code == 503
    assert "every node that could serve llama3.2:latest failed" in response.json()["error"]
    assert "none recovered in time" in response.json()["error"]
    openai = requests.post(router.url + "/v1/chat/completions", json=OPENAI_CHAT, timeout=10)
    assert openai.status_code == 503 and openai.json()["error"]["type"] == "server_error"
    assert router.traces("SELECT COUNT(*) FROM request_traces WHERE status='failed'") == [(2,)]


def test_framing_headers_from_a_proxy_in_front_of_a_node_are_not_handed_on(make_fake, make_router):
    # Waitress refuses a response that carries hop-by-hop headers such as "Trailers": the reply was
    # lost and, made without ever being closed, held its slot for good (one slot: the next waited)
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    fake.extra_headers = {"Trailers": "x", "Trailer": "y", "Keep-Alive": "timeout=5", "X-Node": "kept"}
    router = make_router(nodes=[("a", fake.url)], parallel=1, queue_timeout=2)
    for body in (CHAT, dict(CHAT, stream=True), CHAT):
        answer = requests.post(router.url + "/api/chat", json=body, timeout=10)
        assert answer.status_code == 200 and answer.headers["X-Node"] == "kept"
        assert not {"Trailers", "Trailer", "Keep-Alive"} & set(answer.headers)
    assert router.traces("SELECT status FROM request_traces") == [("completed",)] * 3


def test_a_reply_the_server_never_writes_out_is_ended_by_the_watchdog(make_fake, make_router):
    # a whole reply ends its request when Waitress closes it after writing it; should something
    # fail in between (here an after-request hook), the watchdog ends it after the stall limit
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("a", fake.url)], parallel=1, stall_timeout=1, queue_timeout=10)
    failed = []

    def failing_hook(response):
        if not failed:
            failed.append(True)
            raise RuntimeError("a hook failed")
        return response

    router.app.after_request_funcs.setdefault(None, []).append(failing_hook)
    assert chat(router).status_code == 500
    assert chat(router).status_code == 200  # the one slot came back
    rows = router.traces("SELECT status, error_message FROM request_traces ORDER BY timestamp")
    assert rows == [("failed", "herd's server failed to send the reply it had from the node"), ("completed", None)]


def test_odd_upstream_answers_reach_the_client_in_its_apis_shape(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("a", fake.url)], queue_timeout=2)
    fake.fail_next(1, status=400)  # Ollama's shape of error, on the OpenAI route
    answer = requests.post(router.url + "/v1/chat/completions", json=OPENAI_CHAT, timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "fake failure 400"
    fake.gzip_replies = True  # a compressing proxy in front of the node: herd hands on the body decoded
    answer = requests.post(router.url + "/api/chat", json=CHAT, timeout=10, stream=True)
    assert "Content-Encoding" not in answer.headers and json.loads(answer.raw.read())["done"]
    fake.gzip_replies, fake.redirect_to = False, "http://127.0.0.2:9/elsewhere"
    answer = requests.post(router.url + "/api/chat", json=CHAT, timeout=10, allow_redirects=False)
    assert answer.status_code == 502 and "a redirect to http://127.0.0.2:9/elsewhere" in answer.json()["error"]


def test_mid_stream_failure_ends_ollama_stream_with_error_line(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=6)
    router = make_router(nodes=[("a", fake.url)])
    fake.die_after_chunks = 2
    response = requests.post(router.url + "/api/chat", json=dict(CHAT, stream=True), timeout=10)
    assert response.status_code == 200
    parts = lines(response)
    assert [p["message"]["content"] for p in parts[:2]] == ["tok0 ", "tok1 "]
    assert "error" in parts[-1] and "a" in parts[-1]["error"]
    assert router.traces("SELECT status FROM request_traces") == [("incomplete",)]


def test_mid_stream_failure_ends_openai_stream_with_error_event(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=6)
    router = make_router(nodes=[("a", fake.url)])
    fake.die_after_chunks = 3
    response = requests.post(router.url + "/v1/chat/completions", json=dict(OPENAI_CHAT, stream=True), timeout=10)
    events = [e for e in response.text.split("\n\n") if e.strip()]
    assert len(events) == 4
    last = json.loads(events[-1].removeprefix("data: "))
    assert set(last["error"]) == {"message", "type", "code"}


def test_client_disconnect_frees_the_slot_and_is_traced_cancelled(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], tokens=200, token_delay=0.02)
    router = make_router(nodes=[("a", fake.url)])
    sock = socket.create_connection(("127.0.0.1", int(router.url.rsplit(":", 1)[1])))
    body = json.dumps(dict(CHAT, stream=True)).encode()
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    wait_for(lambda: router.status()["fleet"]["requests_active"] == 0, what="slot freed")
    assert router.traces("SELECT status FROM request_traces") == [("cancelled",)]
    assert chat(router).status_code == 200  # the slot is usable again


def test_unknown_model_is_404_naming_the_fleet_models(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.0})
    router = make_router(nodes=[("a", fake.url)])
    response = chat(router, dict(CHAT, model="mistral"))
    assert response.status_code == 404
    assert "llama3.2:latest, qwen2.5:7b" in response.json()["error"]
    openai = requests.post(router.url + "/v1/chat/completions", json=dict(OPENAI_CHAT, model="mistral"))
    assert openai.status_code == 404
    assert openai.json()["error"]["code"] == "model_not_found"


def test_a_404_names_the_first_20_models_of_a_large_fleet(make_fake, make_router):
    fake = make_fake(models={f"model-{i:02d}": 1.0 for i in range(30)})
    router = make_router(nodes=[("a", fake.url)])
    router.herd.change_settings({"auto_pull": False})
    message = chat(router, dict(CHAT, model="mistral")).json()["error"]
    assert "model-19:latest and 10 more (GET /api/tags lists them)" in message and "model-20" not in message
    assert router.traces("SELECT error_message FROM request_traces") == [(message,)]


def test_malformed_json_is_400_in_each_api_shape(make_fake, make_router):
    router = make_router(nodes=[("a", make_fake().url)])
    ollama = requests.post(router.url + "/api/generate", data=b'{"model": "llama3.2",', timeout=5)
    assert ollama.status_code == 400 and "not valid JSON" in ollama.json()["error"]
    openai = requests.post(router.url + "/v1/chat/completions", data=b"[1, 2]", timeout=5)
    assert openai.status_code == 400 and openai.json()["error"]["type"] == "invalid_request_error"
    no_model = requests.post(router.url + "/api/chat", json={"messages": []}, timeout=5)
    assert no_model.status_code == 400 and '"model"' in no_model.json()["error"]


def test_no_node_online_is_503_saying_how_to_add_one(make_router):
    router = make_router()
    response = chat(router)
    assert response.status_code == 503
    assert "herd-node" in response.json()["error"] and "--node" in response.json()["error"]
    openai = requests.post(router.url + "/v1/embeddings", json={"model": "x", "input": "y"})
    assert openai.status_code == 503 and "herd-node" in openai.json()["error"]["message"]


def test_upstream_4xx_comes_back_as_json_error(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("a", fake.url)])
    fake.fail_next(1, status=400)
    response = chat(router)
    assert response.status_code == 400 and response.json() == {"error": "fake failure 400"}
    assert fake.served == 0 and len(fake.received) == 1  # a client error is not retried elsewhere


def test_body_over_the_cap_is_413(make_fake, make_router):
    router = make_router(nodes=[("a", make_fake().url)], max_body_mb=0.01)
    response = requests.post(router.url + "/api/chat", json=dict(CHAT, pad="x" * 20000), timeout=5)
    assert response.status_code == 413 and "FLEET_MAX_BODY_MB" in response.json()["error"]


def test_trace_rows_equal_requests_and_spec_queries_work(make_fake, make_router):
    fakes = [make_fake(models={"llama3.2": 2.0, "nomic-embed-text": 0.3}, loaded=["llama3.2"]) for _ in range(2)]
    router = make_router(nodes=[("a", fakes[0].url), ("b", fakes[1].url)])
    sent = 0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(chat, router) for _ in range(20)]
        jobs += [pool.submit(requests.post, router.url + "/api/chat", json=dict(CHAT, stream=True))
                 for _ in range(10)]
        jobs += [pool.submit(requests.post, router.url + "/v1/embeddings",
                             json={"model": "nomic-embed-text", "input": "x"}) for _ in range(5)]
        jobs += [pool.submit(requests.post, router.url + "/api/chat", data=b"nope") for _ in range(3)]
        sent = len(jobs)
        [job.result() for job in jobs]
    assert router.traces("SELECT COUNT(*) FROM request_traces")[0][0] == sent
    by_node = router.traces("SELECT model, node_id, AVG(latency_ms)/1000.0, COUNT(*) FROM request_traces "
                            "WHERE status='completed' GROUP BY node_id, model")
    assert sum(row[3] for row in by_node) == 35
    ttft = router.traces("SELECT node_id, model, AVG(time_to_first_token_ms) FROM request_traces "
                         "WHERE time_to_first_token_ms IS NOT NULL GROUP BY node_id, model")
    assert ttft and all(row[2] > 0 for row in ttft)
    tokens = router.traces("SELECT prompt_tokens, completion_tokens FROM request_traces "
                           "WHERE endpoint='/api/chat' AND status='completed'")
    assert set(tokens) == {(7, 5)}


def test_traces_survive_a_clean_shutdown(make_fake, make_router, tmp_path):
    router = make_router(nodes=[("a", make_fake().url)])
    for _ in range(25):
        chat(router)
    router.stop()
    import sqlite3
    with sqlite3.connect(router.config.data_dir / "latency.db") as db:
        assert db.execute("SELECT COUNT(*) FROM request_traces").fetchone()[0] == 25


def test_tags_from_metadata_header_and_openai_user_are_traced(make_fake, make_router):
    router = make_router(nodes=[("a", make_fake().url)])
    chat(router, dict(CHAT, metadata={"tags": ["notes-app"]}), headers={"X-Herd-Tags": "batch, nightly"})
    requests.post(router.url + "/v1/chat/completions", json=dict(OPENAI_CHAT, user="ana"))
    rows = router.traces("SELECT tags FROM request_traces ORDER BY timestamp")
    assert [json.loads(r[0]) for r in rows] == [["notes-app", "batch", "nightly"], ["user:ana"]]


def test_herd_only_fields_are_removed_before_forwarding(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("a", fake.url)])
    chat(router, dict(CHAT, metadata={"tags": ["x"]}, fallback_models=["qwen2.5"], tools=[{"type": "function"}]))
    _, body = fake.received[-1]
    assert "metadata" not in body and "fallback_models" not in body and body["tools"] == [{"type": "function"}]


def test_fallback_model_serves_when_primary_is_nowhere(make_fake, make_router):
    fake = make_fake(models={"qwen2.5:7b": 4.0})
    router = make_router(nodes=[("a", fake.url)])
    response = chat(router, dict(CHAT, model="missing", fallback_models=["qwen2.5:7b"]))
    assert response.status_code == 200 and response.headers["X-Herd-Model"] == "qwen2.5:7b"
    assert fake.received[-1][1]["model"] == "qwen2.5:7b"
    assert router.traces("SELECT model, original_model, fallback_used FROM request_traces") == [
        ("qwen2.5:7b", "missing:latest", 1)]


def test_older_name_field_is_accepted_for_the_model(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("a", fake.url)])
    response = requests.post(router.url + "/api/show", json={"name": "llama3.2"}, timeout=5)
    assert response.status_code == 200 and "capabilities" in response.json()


def test_a_model_named_in_another_case_is_sent_as_the_node_spells_it(make_fake, make_router):
    # Ollama matches model names whatever their case (`ollama run Llama3.2`); herd must find the
    # node that has it, and send the node's own spelling (older Ollama matched exactly)
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("a", fake.url)])
    assert chat(router, dict(CHAT, model="Llama3.2")).status_code == 200
    assert fake.received[-1][1]["model"] == "llama3.2:latest"
    reply = requests.post(router.url + "/v1/chat/completions", json=dict(OPENAI_CHAT, model="LLAMA3.2:Latest"),
                          timeout=10)
    assert reply.status_code == 200 and fake.received[-1][1]["model"] == "llama3.2:latest"
    assert chat(router, dict(CHAT, model="Llama3.3")).status_code == 404  # still no such model


def test_a_spelling_only_an_offline_node_has_does_not_hide_the_online_ones():
    fleet = herd.Fleet(herd.Config())
    for port, (node_id, name) in enumerate((("gone", "Llama3.2:latest"), ("up", "llama3.2:latest")), 9):
        entry = {"name": name, "model": name, "size": 1}
        fleet.report(node_id, f"http://127.0.0.1:{port}", "agent", 5.0,
                     {"ollama": {"reachable": True, "models": [entry], "loaded": []}})
    assert fleet.spelling("Llama3.2:latest") == "Llama3.2:latest"  # both serve: as asked
    fleet.nodes["gone"].reachable = False  # its Ollama stopped answering
    assert fleet.spelling("Llama3.2:latest") == "llama3.2:latest"  # the one a node can serve
    assert fleet.spelling("LLAMA3.2:latest") == "llama3.2:latest"
    fleet.nodes["gone"].reachable = True
    fleet.nodes["gone"].cooldown_until = time.time() + 60  # resting after failures: it would wait
    assert fleet.spelling("Llama3.2:latest") == "llama3.2:latest"
    fleet.nodes["gone"].last_seen -= 3600  # no report for an hour: offline
    assert fleet.spelling("Llama3.2:latest") == "llama3.2:latest"
    fleet.nodes["up"].reachable = False
    assert fleet.spelling("LLAMA3.2:latest") == "Llama3.2:latest"  # none can: as the fleet has it

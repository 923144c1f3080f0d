"""Dashboard API and /metrics: every figure equals the traffic that was sent, follows the range
asked, and the health findings and recommendations show on fleets built to show them."""

import json
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import herd
from conftest import CHAT, OPENAI_CHAT, heartbeat, wait_for

HOUR = 3600


def api(router, path, **params):
    response = requests.get(router.url + "/dashboard/api/" + path, params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def post(router, path, body, **kwargs):
    return requests.post(router.url + path, json=body, timeout=30, **kwargs)


def row(**fields):
    """A trace row as herd writes it, for history a test needs (hours or days ago)."""
    values = {column: None for column in herd.TRACE_COLUMNS}
    values.update(request_id=f"old-{time.monotonic_ns()}", timestamp=time.time(), status="completed",
                  api="ollama", endpoint="/api/chat", retry_count=0, fallback_used=0, stream=0, cold_load=0,
                  reload=0, internal=0, apps='["history"]', latency_ms=1000.0)
    values.update(fields)
    return values


def record(router, *rows):
    for one in rows:
        router.herd.traces.record(one)
    assert router.herd.traces.flush()


def by(items, key):
    return {item[key]: item for item in items}


@pytest.fixture
def traffic(make_fake, make_router):
    """Two nodes and known traffic: 6 tagged chats, 4 OpenAI streams with two tags each, 3 untagged
    embeddings, a request for a missing model, one that needed a retry, one served by a fallback."""
    a = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.0, "nomic-embed-text": 0.3}, loaded=["llama3.2"],
                  token_delay=0.001)
    b = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.0}, loaded=["qwen2.5:7b"], token_delay=0.001)
    router = make_router(nodes=[("a", a.url), ("b", b.url)])
    router.herd.change_settings({"auto_pull": False})
    for _ in range(6):
        assert post(router, "/api/chat", dict(CHAT, metadata={"tags": ["webui"]})).status_code == 200
    for _ in range(4):
        answer = post(router, "/v1/chat/completions", dict(OPENAI_CHAT, model="qwen2.5:7b", stream=True),
                      headers={"X-Herd-Tags": "agent, batch"})
        assert answer.status_code == 200 and "[DONE]" in answer.text
    for _ in range(3):
        assert post(router, "/api/embed", {"model": "nomic-embed-text", "input": ["x"]},
                    headers={"User-Agent": "probe/1.0"}).status_code == 200
    assert post(router, "/api/chat", dict(CHAT, model="missing-model")).status_code == 404
    chosen = [a, b][["a", "b"].index(post(router, "/api/chat", CHAT).headers["X-Herd-Node"])]
    chosen.fail_next(1, status=500)  # the next request goes there first (it just served one), fails, retries
    retried = post(router, "/api/chat", CHAT)
    assert retried.status_code == 200
    assert post(router, "/api/chat", dict(CHAT, model="not-here", fallback_models=["llama3.2"])).status_code == 200
    router.traces()  # everything written
    return router, a, b


def test_counts_tokens_and_apps_equal_the_traffic(traffic):
    router, _, _ = traffic
    models = by(api(router, "models")["models"], "model")
    assert models["llama3.2:latest"]["requests"] == 6 + 2 + 1  # tagged chats, the plain one and the retried one, the fallback
    assert models["qwen2.5:7b"]["requests"] == 4 and models["nomic-embed-text:latest"]["requests"] == 3
    assert models["llama3.2:latest"]["tokens_out"] == 9 * 5  # the fake answers 5 tokens
    assert models["llama3.2:latest"]["retries"] == 1 and models["llama3.2:latest"]["fallbacks"] == 1
    assert models["missing-model:latest"]["errors"] == 1
    assert sorted(n["node_id"] for n in models["llama3.2:latest"]["nodes"]) in (["a"], ["a", "b"], ["b"])
    apps = api(router, "apps")
    by_app = by(apps["apps"], "app")
    assert by_app["webui"]["requests"] == 6 and by_app["webui"]["kind"] == "tag"
    assert by_app["agent"]["requests"] == 4 and by_app["batch"]["requests"] == 4  # each tag counts it...
    assert apps["totals"]["requests"] == 17  # ...and the total once
    assert by_app["probe/1.0 from 127.0.0.1"]["requests"] == 3 and by_app["probe/1.0 from 127.0.0.1"]["kind"] == "client"
    usage = api(router, "usage", hours=1)
    assert usage["totals"]["requests"] == 17 and usage["totals"]["errors"] == 1 and usage["bucket_s"] == 60
    assert sum(bucket["requests"] for bucket in usage["buckets"]) == 17


def test_request_log_filters_and_each_decision_in_full(traffic):
    router, _, _ = traffic
    log = api(router, "traces", limit=50)["traces"]
    assert len(log) == 17 and log[0]["timestamp"] >= log[-1]["timestamp"]  # newest first
    assert len(api(router, "traces")["traces"]) == 17  # the default limit (20) holds all 17
    assert len(api(router, "traces", app="agent")["traces"]) == 4
    assert [(t["model"], t["original_model"]) for t in api(router, "traces", status="failed")["traces"]] == \
        [(None, "missing-model:latest")]  # asked for, served by nothing
    assert len(api(router, "traces", limit=5)["traces"]) == 5
    assert len(api(router, "traces", limit=100000)["traces"]) == 17  # capped, not refused
    retried = next(t for t in log if t["retry_count"])
    detail = api(router, f"traces/{retried['request_id']}")["trace"]
    assert len(detail["attempts"]) == 2 and detail["decision"] == detail["attempts"][-1]
    candidates = by(detail["decision"]["candidates"], "node_id")
    assert set(candidates) <= {"a", "b"} and candidates[detail["node_id"]]["chosen"]
    chosen = candidates[detail["node_id"]]
    assert set(chosen["seconds"]) == {"wait", "load", "reload", "service", "slowdown", "eviction", "risk"}
    assert set(chosen["signals"]) == set(herd.SIGNAL_RANGES)
    assert any(event.get("failed") for event in detail["events"])
    embed = next(t for t in log if t["endpoint"] == "/api/embed")
    excluded = api(router, f"traces/{embed['request_id']}")["trace"]["decision"]["excluded"]
    assert excluded == [{"node_id": "b", "reason": "does not have nomic-embed-text:latest"}]
    refused = next(t for t in log if t["status"] == "failed")
    assert api(router, f"traces/{refused['request_id']}")["trace"]["decision"] is None
    assert requests.get(router.url + "/dashboard/api/traces/nope", timeout=5).status_code == 404


def test_figures_follow_the_range(traffic):
    router, _, _ = traffic
    now = time.time()
    record(router, *[row(timestamp=now - 3 * 86400, model="old-model:latest", node_id="a") for _ in range(5)])
    assert "old-model:latest" not in by(api(router, "models")["models"], "model")  # 24 h
    week = by(api(router, "models", hours=168)["models"], "model")
    assert week["old-model:latest"]["requests"] == 5
    assert by(api(router, "models", since=now - 4 * 86400)["models"], "model")["old-model:latest"]["requests"] == 5
    assert api(router, "usage", hours=168)["totals"]["requests"] == 17 + 5
    assert requests.get(router.url + "/dashboard/api/models?hours=abc", timeout=5).status_code == 400


def test_long_ranges_read_rollups_and_agree_with_the_rows(make_router):
    router = make_router()
    now = time.time()
    old = [row(timestamp=now - 2 * 86400 - i * 600, model="m:latest", node_id="n", latency_ms=100.0 * (i + 1),
               prompt_tokens=10, completion_tokens=20) for i in range(30)]
    record(router, *old)
    before = api(router, "models", hours=720)["models"][0]
    with router.herd.traces._connect() as db:
        router.herd.traces._roll_up_hours(db)  # the writer does this once an hour has ended
        assert db.execute("SELECT COUNT(*) FROM request_rollups").fetchone()[0] > 0
    after = api(router, "models", hours=720)["models"][0]
    assert (after["requests"], after["tokens_in"], after["tokens_out"]) == (30, 300, 600)
    assert after == before  # the same figures, from rollups instead of rows


def test_the_dashboards_own_requests_are_not_traced(traffic):
    router, _, _ = traffic
    rows = router.traces("SELECT COUNT(*) FROM request_traces")
    for path in ("models", "usage", "apps", "health", "recommendations", "model-management", "benchmarks",
                 "traces", "settings"):
        api(router, path)
    requests.get(router.url + "/dashboard", timeout=5)
    requests.get(router.url + "/metrics", timeout=5)
    assert router.traces("SELECT COUNT(*) FROM request_traces") == rows


def test_metrics_parse_and_match_the_traffic(traffic):
    router, _, _ = traffic
    text = requests.get(router.url + "/metrics", timeout=5).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests_total = sum(s.value for s in families["herd_requests"].samples if s.name == "herd_requests_total")
    assert requests_total == 17
    completed = sum(s.value for s in families["herd_requests"].samples
                    if s.name == "herd_requests_total" and s.labels["status"] == "completed")
    assert completed == 16
    assert sum(s.value for s in families["herd_retries"].samples if s.name == "herd_retries_total") == 1
    assert sum(s.value for s in families["herd_fallbacks"].samples if s.name == "herd_fallbacks_total") == 1
    durations = [s for s in families["herd_request_duration_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in durations) == 17
    buckets = {s.labels["le"] for s in families["herd_request_duration_seconds"].samples if s.name.endswith("_bucket")}
    assert {"0.005", "300", "+Inf"} <= buckets
    up = {s.labels["node"]: s.value for s in families["herd_node_up"].samples}
    assert up == {"a": 1, "b": 1}
    labels = {key for family in families.values() for sample in family.samples for key in sample.labels}
    assert labels <= {"node", "model", "api", "status", "le"}


def test_health_is_quiet_on_a_healthy_fleet_and_names_each_problem(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    other = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router()
    heartbeat(router, "good", fake)
    heartbeat(router, "peer", other)
    healthy = api(router, "health")
    assert healthy["findings"] == [] and healthy["score"] == 100 and healthy["vitals"]["nodes_online"] == 2

    heartbeat(router, "good", fake, memory={"total_gb": 32, "available_gb": 1}, interval_s=0.2)
    heartbeat(router, "peer", other, ollama={"reachable": True, "version": "0.11.0", "models": [], "loaded": []})
    now = time.time()
    record(router, *[row(model="llama3.2:latest", node_id="good", cold_load=1, load_ms=2000.0,
                         timestamp=now - i) for i in range(4)],
           *[row(model="llama3.2:latest", node_id="good", reload=1, timestamp=now - 10 - i) for i in range(3)],
           *[row(model="llama3.2:latest", node_id="good", completion_tokens=100, eval_ms=1000.0,
                 timestamp=now - 20 - i) for i in range(5)],
           *[row(model="llama3.2:latest", node_id="peer", completion_tokens=100, eval_ms=250.0,
                 timestamp=now - 30 - i) for i in range(5)],
           *[row(status="failed", timestamp=now - 40 - i) for i in range(4)],
           *[row(status="completed", retry_count=1, timestamp=now - 50 - i) for i in range(3)],
           row(status="reaped", timestamp=now - 60), row(status="incomplete", timestamp=now - 61))
    findings = by(api(router, "health")["findings"], "id")
    assert {"memory_pressure", "ollama_versions_differ", "model_thrashing", "context_reloads", "slow_node",
            "error_rate", "retry_rate", "reaped", "cut_streams"} <= set(findings)
    assert findings["memory_pressure"]["node_id"] == "good" and "1.0 of 32.0 GB" in findings["memory_pressure"]["evidence"]
    assert findings["slow_node"]["node_id"] == "good" and "100 tokens/s against 400" in findings["slow_node"]["evidence"]
    assert findings["model_thrashing"]["fix"].startswith("Raise OLLAMA_MAX_LOADED_MODELS")
    wait_for(lambda: "node_offline" in by(api(router, "health")["findings"], "id"), timeout=3, what="offline")
    health = api(router, "health")
    assert health["findings"][0]["severity"] == "critical" and health["score"] < 50


def test_an_agentless_node_is_named_in_health(make_fake, make_router):
    fake = make_fake()
    router = make_router(nodes=[("polled", fake.url)])
    findings = api(router, "health")["findings"]
    assert [(f["id"], f["node_id"], f["severity"]) for f in findings] == [("agentless_node", "polled", "info")]


def test_recommendations_carry_their_numbers(make_fake, make_router):
    fast = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.0, "unused": 3.0}, loaded=["llama3.2"])
    slow = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.0}, loaded=["llama3.2"])
    router = make_router()
    heartbeat(router, "fast", fast, memory_budget_gb=64)
    heartbeat(router, "slow", slow, memory_budget_gb=64)
    now = time.time()
    record(router,
           *[row(model="qwen2.5:7b", node_id="slow", timestamp=now - 600 * i, cold_load=int(i % 3 == 0),
                 load_ms=3000.0, completion_tokens=100, eval_ms=2000.0) for i in range(9)],
           *[row(model="qwen2.5:7b", node_id="fast", timestamp=now - 5 - i, completion_tokens=100, eval_ms=500.0)
             for i in range(5)],
           *[row(model="llama3.2:latest", node_id=node, timestamp=now - 7) for node in ("fast", "slow")])
    recommendations = api(router, "recommendations")["recommendations"]
    kinds = {(r["kind"], r["node_id"], r["model"]): r for r in recommendations}
    keep = kinds[("keep_alive", "slow", "qwen2.5:7b")]
    assert keep["evidence"]["cold_loads"] == 3 and keep["evidence"]["longest_idle_gap_s"] == pytest.approx(600, abs=1)
    assert "keep_alive 10m" in keep["reason"]
    assert kinds[("unused_on_disk", "fast", "unused:latest")]["evidence"] == {"requests": 0, "size_gb": 3.0}
    better = kinds[("better_node", "fast", "qwen2.5:7b")]
    assert better["evidence"]["decode_tps"] == {"fast": 200.0, "slow": 50.0}


def test_model_management_delete_and_pull(traffic):
    router, a, b = traffic
    nodes = by(api(router, "model-management")["nodes"], "node_id")
    models = by(nodes["a"]["models"], "name")
    assert models["llama3.2:latest"]["loaded"] and models["llama3.2:latest"]["expires_at"]
    assert models["nomic-embed-text:latest"]["requests"] == 3 and models["nomic-embed-text:latest"]["last_used"]
    assert nodes["a"]["disk_used_gb"] == pytest.approx(6.3)
    deleted = post(router, "/dashboard/api/delete", {"model": "qwen2.5:7b", "node_id": "a"})
    assert deleted.status_code == 200 and deleted.json()["deleted"]
    assert "qwen2.5:7b" not in a.models and "qwen2.5:7b" in b.models
    # (a poll of node a that began before the delete may show the model once more: the next one does not)
    wait_for(lambda: "qwen2.5:7b" not in by(by(api(router, "model-management")["nodes"], "node_id")["a"]["models"],
                                           "name"), what="the deleted model gone from the view")
    assert post(router, "/dashboard/api/delete", {"model": "qwen2.5:7b", "node_id": "a"}).status_code == 404
    b.pull_steps, b.token_delay = 6, 0.15  # about a second, so the progress is seen on the way
    assert post(router, "/dashboard/api/pull", {"model": "phi4", "node_id": "b"}).status_code == 202
    seen = set()

    def pulled():
        pulls = api(router, "model-management")["pulls"]
        seen.update(p["percent"] for p in pulls)
        return pulls and pulls[0]["status"] == "success"

    wait_for(pulled, what="pull finished")
    assert "phi4:latest" in b.models and len(seen) >= 3  # progress was visible on the way


def test_a_benchmark_runs_through_admission_and_is_stored(traffic):
    router, a, _ = traffic
    refused = post(router, "/dashboard/api/benchmarks", {"node_id": "a", "model": "qwen2.5:7b"})
    assert refused.status_code == 409 and "not loaded" in refused.json()["error"]
    run = post(router, "/dashboard/api/benchmarks", {"node_id": "a", "model": "llama3.2"}).json()["run"]
    assert run["single"]["streams"] == 1 and run["single"]["completed"] == 1
    assert run["parallel"]["streams"] == 1 and run["error"] is None  # the fake runs one at a time
    assert run["single"]["decode_tps"] > 0 and run["num_predict"] == herd.BENCH_PREDICT
    stored = api(router, "benchmarks")
    assert [r["run_id"] for r in stored["runs"]] == [run["run_id"]]
    assert by(api(router, "models")["models"], "model")["llama3.2:latest"]["requests"] == 9  # not counted
    tagged = router.traces("SELECT COUNT(*) FROM request_traces WHERE internal = 1")[0][0]
    assert tagged == 2 and all(body.get("options", {}).get("num_predict") == herd.BENCH_PREDICT
                               for path, body in a.received[-2:])


def test_changes_to_the_fleet_need_the_key_when_one_is_set(make_fake, make_router):
    fake = make_fake()
    router = make_router(nodes=[("a", fake.url)], api_key="k")
    assert post(router, "/dashboard/api/delete", {"model": "llama3.2", "node_id": "a"}).status_code == 401
    assert requests.get(router.url + "/dashboard", timeout=5).status_code == 200  # the page itself is open
    assert requests.get(router.url + "/dashboard/api/models", timeout=5).status_code == 401
    key = {"Authorization": "Bearer k"}
    assert requests.get(router.url + "/metrics", headers=key, timeout=5).status_code == 200
    assert post(router, "/dashboard/api/delete", {"model": "llama3.2", "node_id": "a"}, headers=key).status_code == 200


def test_empty_data_gives_empty_lists(make_router):
    router = make_router()
    assert api(router, "models")["models"] == [] and api(router, "apps")["apps"] == []
    assert api(router, "usage")["buckets"] == [] and api(router, "traces")["traces"] == []
    assert api(router, "recommendations")["recommendations"] == []
    assert api(router, "benchmarks")["traffic"] == [] and api(router, "model-management")["nodes"] == []
    assert api(router, "health")["vitals"]["requests"] == 0

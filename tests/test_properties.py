"""Property-based tests over herd's JSON routes: whatever the body, no 5xx, a JSON answer, no
background thread dies, and every client request leaves exactly one trace row."""

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import wait_for

CLIENT_ROUTES = ["/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show", "/api/pull",
                 "/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
UNTRACED_ROUTES = ["/heartbeat", "/dashboard/api/settings", "/dashboard/api/pull"]
FIELDS = ["model", "name", "messages", "prompt", "system", "input", "options", "stream", "fallback_models",
          "metadata", "user", "max_tokens", "tools", "images", "node_id", "ollama_url", "ollama", "auto_pull",
          "interval_s", "num_parallel", "memory_budget_gb", "keep_alive", "format"]
OPTIONS = ["num_ctx", "num_predict", "temperature", "stop", "use_mmap", "seed", "num_gpu", "top_k", "newish"]

scalars = (st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
           | st.sampled_from(["llama3.2", "llama3.2:latest", "bad\ud800:1b", "x\r\ny", "\u202e", "", " "]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS + OPTIONS + ["text", "role", "content", "type"])
                                        | st.text(max_size=6), inner, max_size=4), max_leaves=16)
shaped = st.fixed_dictionaries({"model": st.sampled_from(["llama3.2", "nomic-embed-text"]) | scalars},
                               optional={key: values for key in FIELDS if key != "model"}
                               | {"options": st.dictionaries(st.sampled_from(OPTIONS), values, max_size=4),
                                  "messages": st.lists(st.fixed_dictionaries(
                                      {"role": st.sampled_from(["user", "system"]) | scalars},
                                      optional={"content": values, "images": values}), max_size=3)})
bodies = (shaped.map(lambda body: json.dumps(body).encode())
          | values.map(lambda body: json.dumps(body).encode())
          | st.binary(max_size=64)
          | st.sampled_from([b"", b"{", b"[" * 3000, b'{"model": NaN}', b'{"model": "llama3.2", "x": 1e999}']))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """One router and one fake node for every example (a fresh pair per example would be slow)."""
    import herd
    from conftest import Router
    from fake_ollama import FakeOllama

    fake = FakeOllama(models={"llama3.2": 2.0, "nomic-embed-text": 0.3}, loaded=["llama3.2"]).start()
    config = herd.Config(host="127.0.0.1", port=0, data_dir=tmp_path_factory.mktemp("props"), threads=32,
                         nodes=[("a", fake.url)], mdns=False, local=False, poll_interval=0.2)
    router = Router(config)
    router.wait_online(1)
    yield fake, router
    router.stop()
    fake.stop()


def rows(router):
    return router.traces("SELECT COUNT(*) FROM request_traces")[0][0]


def threads_alive(router):
    parts = router.herd
    return all(thread.is_alive() for thread in [parts.traces.thread, parts.watchdog.thread, parts.warmer.thread,
                                                *parts.poller.threads])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(CLIENT_ROUTES + UNTRACED_ROUTES), raw=bodies)
def test_no_body_gives_a_5xx_a_non_json_answer_a_dead_thread_or_a_lost_row(fleet, route, raw):
    fake, router = fleet
    before = rows(router)
    response = requests.post(router.url + route, data=raw, headers={"Content-Type": "application/json"},
                             timeout=30)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400 or "json" in response.headers.get("Content-Type", ""):
        answer = response.json() if "ndjson" not in response.headers.get("Content-Type", "") else {}
        assert response.status_code < 400 or "error" in answer
    assert threads_alive(router)
    expected = before + (1 if route in CLIENT_ROUTES else 0)
    wait_for(lambda: rows(router) == expected, timeout=5, what=f"{expected} trace rows (had {rows(router)})")

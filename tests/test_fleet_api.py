"""Fleet API, heartbeats, model management routes and the API key."""

import time

import requests

from conftest import chat, heartbeat, wait_for


def test_root_and_version_answer_locally(make_router):
    router = make_router()
    assert requests.get(router.url + "/").text == "herd is running"
    assert requests.get(router.url + "/api/version").json()["version"]


def test_tags_and_ps_are_the_union_with_node_lists(make_fake, make_router):
    a = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.0}, loaded=["llama3.2"])
    b = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("a", a.url), ("b", b.url)])
    tags = requests.get(router.url + "/api/tags").json()["models"]
    assert [(m["name"], m["nodes"]) for m in tags] == [("llama3.2:latest", ["a", "b"]), ("qwen2.5:7b", ["a"])]
    assert tags[0]["size"] == 2 * 1024 ** 3 and tags[0]["details"]["format"] == "gguf"
    ps = requests.get(router.url + "/api/ps").json()["models"]
    assert [(m["name"], m["nodes"]) for m in ps] == [("llama3.2:latest", ["a", "b"])]
    models = requests.get(router.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["llama3.2:latest", "qwen2.5:7b"]


def test_heartbeat_registers_a_node_and_it_goes_offline_after_three_missed_intervals(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0})
    router = make_router()
    assert heartbeat(router, "laptop", fake, interval_s=0.2).status_code == 200
    assert router.status()["nodes"][0]["status"] == "online"
    assert chat(router).headers["X-Herd-Node"] == "laptop"
    time.sleep(0.45)
    assert router.status()["nodes"][0]["status"] == "online"  # two intervals late: still online
    wait_for(lambda: router.status()["nodes"][0]["status"] == "offline", timeout=2, what="offline")
    assert chat(router).status_code == 503
    heartbeat(router, "laptop", fake, interval_s=0.2)
    assert router.status()["nodes"][0]["status"] == "online"  # back on its next heartbeat


def test_same_node_id_from_a_new_address_replaces_the_old_entry(make_fake, make_router):
    old, new = make_fake(models={"llama3.2": 2.0}), make_fake(models={"llama3.2": 2.0})
    router = make_router()
    heartbeat(router, "box", old)
    heartbeat(router, "box", new)
    nodes = router.status()["nodes"]
    assert len(nodes) == 1 and nodes[0]["ollama_url"] == new.url
    chat(router)
    assert new.served == 1 and old.served == 0


def test_bad_heartbeats_get_400_saying_what_is_wrong(make_fake, make_router):
    router = make_router()
    fake = make_fake()
    bad_url = heartbeat(router, "x", fake, ollama_url="file:///etc/passwd")
    assert bad_url.status_code == 400 and "http(s)" in bad_url.json()["error"]
    missing = requests.post(router.url + "/heartbeat", json={"hostname": "x"})
    assert missing.status_code == 400 and "node_id, ollama_url, ollama" in missing.json()["error"]
    garbage = requests.post(router.url + "/heartbeat", data=b"\xff")
    assert garbage.status_code == 400
    assert router.status()["nodes"] == []


def test_unreachable_ollama_in_a_heartbeat_is_degraded_and_not_routed(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0})
    router = make_router()
    heartbeat(router, "box", fake, ollama={"reachable": False, "error": "connection refused"})
    node = router.status()["nodes"][0]
    assert node["status"] == "degraded" and node["ollama_error"] == "connection refused"
    assert chat(router).status_code == 503


def test_api_key_is_required_everywhere_but_root(make_fake, make_router):
    fake = make_fake()
    router = make_router(nodes=[("a", fake.url)], api_key="s3cret")
    assert requests.get(router.url + "/").status_code == 200
    denied = requests.get(router.url + "/api/tags")
    assert denied.status_code == 401 and "Bearer" in denied.json()["error"]
    assert requests.post(router.url + "/v1/chat/completions", json={}).json()["error"]["type"] == "authentication_error"
    auth = {"Authorization": "Bearer s3cret"}
    assert requests.get(router.url + "/api/tags", headers=auth).status_code == 200
    assert chat(router, headers=auth).status_code == 200


def test_pull_streams_progress_from_the_chosen_node(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("a", fake.url)])
    response = requests.post(router.url + "/api/pull", json={"model": "phi4"}, timeout=10)
    assert response.status_code == 200 and response.headers["X-Herd-Node"] == "a"
    assert response.text.strip().splitlines()[-1] == '{"status":"success"}'
    assert "phi4:latest" in fake.models


def test_a_pull_named_in_another_case_updates_the_node_that_has_the_model(make_fake, make_router):
    roomy = make_fake(models={"qwen2.5:0.5b": 0.5})
    has_it = make_fake(models={"llama3.2": 2.0})
    router = make_router()
    heartbeat(router, "roomy", roomy, memory_budget_gb=64)
    heartbeat(router, "has-it", has_it, memory_budget_gb=8)
    router.wait_online(2)
    response = requests.post(router.url + "/api/pull", json={"model": "Llama3.2"}, timeout=10)
    assert response.status_code == 200 and response.headers["X-Herd-Node"] == "has-it"
    assert list(roomy.models) == ["qwen2.5:0.5b"]  # no second copy pulled onto it


def test_delete_needs_a_node_and_goes_only_there(make_fake, make_router):
    a, b = make_fake(models={"llama3.2": 2.0}), make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("a", a.url), ("b", b.url)])
    refused = requests.delete(router.url + "/api/delete", json={"model": "llama3.2"})
    assert refused.status_code == 400 and "X-Herd-Node" in refused.json()["error"]
    done = requests.delete(router.url + "/api/delete", json={"model": "llama3.2"}, headers={"X-Herd-Node": "b"})
    assert done.status_code == 200
    assert "llama3.2:latest" in a.models and "llama3.2:latest" not in b.models
    unknown = requests.delete(router.url + "/api/delete", json={"model": "x"}, headers={"X-Herd-Node": "zz"})
    assert unknown.status_code == 404 and "a, b" in unknown.json()["error"]


def test_unsupported_model_management_is_501(make_router):
    router = make_router()
    for path in ("/api/copy", "/api/create", "/api/push", "/api/blobs/sha256:abc"):
        response = requests.post(router.url + path, json={})
        assert response.status_code == 501 and "does not support" in response.json()["error"]


def test_unknown_route_and_wrong_method_are_json(make_router):
    router = make_router()
    assert requests.get(router.url + "/api/nothing").json()["error"].startswith("herd has no route")
    wrong = requests.get(router.url + "/api/chat")
    assert wrong.status_code == 405 and "does not take GET" in wrong.json()["error"]

"""Bad input on every route: a 4xx in the API's shape that names the field, one trace row, and
nothing stored that could break a route or a background thread afterwards."""

import json
import socket
import time

import pytest
import requests

import herd
from conftest import CHAT, OPENAI_CHAT, chat, heartbeat, wait_for

DEEP = b'{"model": "llama3.2", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"


def post(router, path, body=None, raw=None, **kwargs):
    data = raw if raw is not None else json.dumps(body, ensure_ascii=True).encode()
    return requests.post(router.url + path, data=data, headers={"Content-Type": "application/json",
                                                                **kwargs.pop("headers", {})}, timeout=10, **kwargs)


def error_text(response, api):
    """The error message, checking the body has the API's own error shape."""
    body = response.json()
    if api == "openai":
        assert set(body["error"]) == {"message", "type", "code"}
        return body["error"]["message"]
    assert isinstance(body["error"], str)
    return body["error"]


def chat_with(**fields):
    return dict(CHAT, **fields)


def chat_message(content):
    return chat_with(messages=[{"role": "user", "content": content}])


CLIENT_CASES = [
    # (what, path, body or raw bytes, what the error names)
    ("not JSON", "/api/chat", b"{nope", "not valid JSON"),
    ("a JSON list", "/api/chat", [1, 2], "a JSON object"),
    ("nested 5000 deep", "/api/chat", DEEP, "nested"),
    ("NaN", "/api/chat", b'{"model": "llama3.2", "options": {"temperature": NaN}}', "NaN"),
    ("1e400", "/api/chat", b'{"model": "llama3.2", "options": {"num_ctx": 1e400}}', "1e400"),
    ("no model", "/api/chat", {"messages": []}, '"model"'),
    ("model a number", "/api/chat", chat_with(model=5), '"model"'),
    ("model with a lone surrogate", "/api/chat", chat_with(model="bad\ud800:1b"), '"model"'),
    ("model with CR LF", "/api/chat", chat_with(model="llama\r\nX-Evil: 1"), '"model"'),
    ("model with U+202E", "/api/chat", chat_with(model="llama\u202e3.2"), '"model"'),
    ("model 10,000 characters", "/api/chat", chat_with(model="m" * 10_000), '"model"'),
    ("messages a number", "/api/chat", chat_with(messages=5), '"messages"'),
    ("messages a string", "/api/chat", chat_with(messages="hi"), '"messages"'),
    ("a message not an object", "/api/chat", chat_with(messages=["hi"]), '"messages[0]"'),
    ("part text a number", "/v1/chat/completions", dict(OPENAI_CHAT, messages=[
        {"role": "user", "content": [{"type": "text", "text": 5}]}]), '"messages[0].content[0].text"'),
    ("part text null", "/v1/chat/completions", dict(OPENAI_CHAT, messages=[
        {"role": "user", "content": [{"type": "text", "text": None}]}]), '"messages[0].content[0].text"'),
    ("content a number", "/api/chat", chat_message(7), '"messages[0].content"'),
    ("num_ctx a string", "/api/chat", chat_with(options={"num_ctx": "abc"}), '"options.num_ctx"'),
    ("num_ctx negative", "/api/chat", chat_with(options={"num_ctx": -5}), '"options.num_ctx"'),
    ("num_predict a string", "/api/generate", {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": "abc"}},
     '"options.num_predict"'),
    ("temperature a string", "/api/chat", chat_with(options={"temperature": "hot"}), '"options.temperature"'),
    ("options a list", "/api/chat", chat_with(options=[1]), '"options"'),
    ("stream a string", "/api/chat", chat_with(stream="yes"), '"stream"'),
    ("prompt a number", "/api/generate", {"model": "llama3.2", "prompt": 42}, '"prompt"'),
    ("embed input numbers", "/api/embed", {"model": "llama3.2", "input": [1, 2]}, '"input[0]"'),
    ("embed input an object", "/api/embed", {"model": "llama3.2", "input": {"a": 1}}, '"input"'),
    ("fallback_models a string", "/api/chat", chat_with(fallback_models="qwen"), '"fallback_models"'),
    ("metadata.tags numbers", "/api/chat", chat_with(metadata={"tags": [1]}), '"metadata.tags[0]"'),
    ("OpenAI user a number", "/v1/chat/completions", dict(OPENAI_CHAT, user=5), '"user"'),
    ("max_tokens zero", "/v1/chat/completions", dict(OPENAI_CHAT, max_tokens=0), '"max_tokens"'),
    ("images a string", "/api/chat", chat_with(messages=[{"role": "user", "content": "x", "images": "abc"}]),
     '"messages[0].images"'),
    ("tools an object", "/v1/chat/completions", dict(OPENAI_CHAT, tools={"a": 1}), '"tools"'),
]


@pytest.fixture
def fleet(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("a", fake.url)])
    return fake, router


@pytest.mark.parametrize("what, path, body, names", CLIENT_CASES, ids=[c[0] for c in CLIENT_CASES])
def test_bad_client_requests_get_400_naming_the_field(fleet, what, path, body, names):
    fake, router = fleet
    response = post(router, path, raw=body) if isinstance(body, bytes) else post(router, path, body)
    api = "openai" if path.startswith("/v1/") else "ollama"
    assert response.status_code == 400, response.text
    assert names in error_text(response, api)
    assert fake.received == []  # nothing was forwarded to blame the node
    assert router.traces("SELECT status, endpoint FROM request_traces") == [("failed", path)]
    assert chat(router).status_code == 200  # and the router still serves (and writes rows)
    assert router.traces("SELECT COUNT(*) FROM request_traces") == [(2,)]


def test_a_refused_request_keeps_its_client_and_its_one_request_id(fleet):
    # the row of a request refused at the door names its client as a served one's does (the
    # User-Agent, a character beyond ASCII shown as '?'), and uses the id it was read under: the next
    # request's id is the one after it
    _, router = fleet
    agent = {"User-Agent": "\xe9vil-script/1.0 (test)"}
    assert post(router, "/api/chat", {"model": "llama3.2", "messages": 5}, headers=agent).status_code == 400
    assert post(router, "/api/chat", CHAT, headers=agent).status_code == 200
    rows = router.traces("SELECT request_id, status, user_agent, apps FROM request_traces ORDER BY timestamp")
    assert [(status, user_agent) for _, status, user_agent, _ in rows] == [
        ("failed", "?vil-script/1.0 (test)"), ("completed", "?vil-script/1.0 (test)")]
    assert rows[0][3] == rows[1][3] == json.dumps(["?vil-script/1.0 from 127.0.0.1"])
    (boot, first), (_, second) = (row[0].rsplit("-", 1) for row in rows)
    assert int(second) == int(first) + 1


def test_fields_herd_does_not_read_pass_through_untouched(fleet):
    fake, router = fleet
    router.herd.change_settings({"context_protection": "passthrough"})  # herd's one edit, off
    body = chat_with(future_field={"nested": [1, {"x": None}]}, keep_alive="5m", format="json",
                     options={"temperature": 0.2, "brand_new_option": "whatever"})
    assert post(router, "/api/chat", body).status_code == 200
    assert fake.received[-1][1] == body


def test_openai_token_lists_are_accepted_for_embeddings(fleet):
    fake, router = fleet
    response = post(router, "/v1/embeddings", {"model": "llama3.2", "input": [[1, 2, 3], [4]]})
    assert response.status_code == 200
    assert fake.received[-1][1]["input"] == [[1, 2, 3], [4]]


def test_a_lone_surrogate_in_a_row_is_written_escaped_and_the_writer_goes_on(fleet):
    _, router = fleet
    store = router.herd.traces
    row = {column: None for column in herd.TRACE_COLUMNS}
    row.update(request_id="odd-1", timestamp=time.time(), error_message="bad\ud800 text", status="failed",
               retry_count=10 ** 30)
    store.record(row)
    assert chat(router).status_code == 200
    rows = router.traces("SELECT request_id, error_message, retry_count FROM request_traces ORDER BY timestamp")
    assert rows[0] == ("odd-1", "bad\\ud800 text", 1e30)  # SQLite keeps a too-large integer as REAL
    assert len(rows) == 2 and store.thread.is_alive()


def test_body_over_the_limit_gets_json_413_and_a_row(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("a", fake.url)], max_body_mb=0.01)
    for path, api in (("/api/chat", "ollama"), ("/v1/chat/completions", "openai")):
        response = post(router, path, chat_message("x" * 20_000))
        assert response.status_code == 413 and "FLEET_MAX_BODY_MB" in error_text(response, api)
    assert router.traces("SELECT status, endpoint FROM request_traces") == [("failed", "/api/chat"),
                                                                         ("failed", "/v1/chat/completions")]


def test_a_body_of_millions_of_tiny_arrays_is_refused_before_parsing(fleet):
    # 1.1 million empty arrays (3.3 MB) took Python a quarter of a second to parse, ten million
    # (30 MB, under the body limit) seconds, holding the interpreter's lock against every request
    fake, router = fleet
    arrays = b"[" + b"[]," * 1_100_000 + b"[]]"
    for path, api, raw in (("/api/chat", "ollama", b'{"model": "llama3.2", "messages": ' + arrays + b"}"),
                           ("/v1/embeddings", "openai", b'{"model": "llama3.2", "input": ' + arrays + b"}")):
        response = post(router, path, raw=raw)
        assert response.status_code == 413 and "1,000,000" in error_text(response, api), response.text
    assert fake.received == []
    assert router.traces("SELECT status, endpoint FROM request_traces") == [("failed", "/api/chat"),
                                                                         ("failed", "/v1/embeddings")]
    # as many brackets each in a string of its own: too many strings to sort out before parsing
    response = post(router, "/api/embed", raw=b'{"model": "llama3.2", "input": [' + b'"[",' * 1_100_000 + b'"x"]}')
    assert response.status_code == 413 and "strings" in error_text(response, "ollama"), response.text
    long_code = "x = [{'a': [1]}]\n" * 40_000  # 160,000 brackets in a prompt: parsed as usual
    assert chat(router, dict(CHAT, messages=[{"role": "user", "content": long_code}])).status_code == 200


@pytest.mark.parametrize("text", ['{"a": [' * 600_000, 'say "[[" and \\' * 600_000],
                         ids=["json-documents", "escapes"])
def test_brackets_inside_strings_do_not_count_against_the_limit(fleet, text):
    # over a million [ and { in strings (JSON or code sent to embed) are text, not arrays to parse
    fake, router = fleet
    assert text.count("[") + text.count("{") > herd.MAX_JSON_CONTAINERS
    response = post(router, "/api/embed", {"model": "llama3.2", "input": [text, "[]"]})
    assert response.status_code == 200, response.text
    assert fake.received[-1][1]["input"][0] == text
    assert router.traces("SELECT status FROM request_traces") == [("completed",)]


def test_brackets_outside_strings_are_counted_exactly():
    cases = [(rb'{"a": "[{"}', 1), (rb'["\\", [], "\"[", {}]', 3), (rb'["\\\"[", []]', 2), (rb'[[{}]]', 3),
             (rb'"[[{"', 0), (rb'["a\\\\"]', 1), (rb'["\\\\\"[{", {"b": "\\"}]', 2)]
    for raw, expected in cases:
        json.loads(raw)  # (each is a whole JSON text)
        assert herd.brackets_outside_strings(raw, 10) == expected, raw
    assert herd.brackets_outside_strings(b'["[", "{", "["]', 3) == 1
    assert herd.brackets_outside_strings(b'["[", "{", "[", "{"]', 3) is None  # four strings: more than 3
    assert herd.brackets_outside_strings(rb'["\"\"\"\"", "["]', 2) == 1  # escaped quotes are not strings


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_bodies_in_utf_16_and_32_are_counted_as_characters(encoding):
    # a character such as U+2200 is the bytes 00 22 in UTF-16-LE: a quote byte that is no quote
    arrays = '{"x": "\u2200", "input": [' + "[]," * 1_100_000 + '[]], "y": "\u2200"}'
    with pytest.raises(herd.HerdError) as refused:
        herd.parse_json(arrays.encode(encoding))
    # 1,100,001 empty arrays, the list holding them and the object: 1,100,003
    assert refused.value.status == 413 and "1,100,003 arrays and objects" in refused.value.message
    text = 'say "[[" and \\' * 600_000  # brackets and escaped quotes in a string: text
    assert herd.parse_json(json.dumps({"input": [text]}, ensure_ascii=False).encode(encoding)) == {"input": [text]}


def test_a_request_waitress_cannot_parse_gets_json(fleet):
    _, router = fleet
    port = int(router.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # Waitress closes the connection after an error
            answer += chunk
        answer = answer.decode("latin-1")
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400") and "application/json" in head
    assert "herd could not read the HTTP request" in json.loads(body)["error"]
    wait_for(lambda: router.traces("SELECT COUNT(*) FROM request_traces")[0][0] == 1, what="row")


def raw_request(path, body, close=False):
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n").encode() + data


def read_all(sock):
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_requests_waitress_drops_unanswered_still_get_a_row(fleet):
    # Waitress runs no request whose client has closed its side of the connection, and drops the
    # requests pipelined behind a reply that closes it (every stream): each still gets its row
    _, router = fleet
    port = int(router.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw_request("/api/chat", CHAT))
        sock.shutdown(socket.SHUT_WR)  # a half-close: Waitress takes the client for gone
        read_all(sock)
    streamed = dict(CHAT, stream=True)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw_request("/api/chat", streamed) + raw_request("/v1/chat/completions", OPENAI_CHAT, close=True))
        assert read_all(sock).count(b"HTTP/1.1 200") == 1  # the stream; then the connection closes
    wait_for(lambda: router.traces("SELECT COUNT(*) FROM request_traces")[0][0] == 3, what="three rows")
    rows = router.traces("SELECT endpoint, status FROM request_traces ORDER BY timestamp")
    # (the half-closed one is served when a thread takes it up before Waitress reads the close)
    assert rows[0] in (("/api/chat", "cancelled"), ("/api/chat", "completed"))
    assert rows[1:] == [("/api/chat", "completed"), ("/v1/chat/completions", "cancelled")]


def test_a_bad_header_on_an_openai_route_gets_an_openai_error(fleet):
    _, router = fleet
    port = int(router.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\n{}")
        head, _, body = read_all(sock).decode("latin-1").partition("\r\n\r\n")
    assert head.split()[1] == "400"  # (Waitress answers in HTTP/1.0 when the head did not parse)
    assert set(json.loads(body)["error"]) == {"message", "type", "code"}
    wait_for(lambda: router.traces("SELECT api, endpoint FROM request_traces") == [("openai", "/v1/chat/completions")],
             what="its row")


def test_unknown_routes_wrong_methods_and_missing_keys_are_traced(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("a", fake.url)], api_key="k")
    key = {"Authorization": "Bearer k"}
    assert requests.get(router.url + "/api/nothing", headers=key).status_code == 404
    assert requests.get(router.url + "/api/chat", headers=key).status_code == 405
    assert requests.post(router.url + "/api/chat", json=CHAT).status_code == 401
    assert requests.post(router.url + "/api/pull", json={"model": 5}, headers=key).status_code == 400
    assert requests.delete(router.url + "/api/delete", json={"model": "llama3.2"}, headers=key).status_code == 400
    assert requests.get(router.url + "/api/tags", headers=key).status_code == 200  # a read: no row
    rows = router.traces("SELECT endpoint, status FROM request_traces ORDER BY timestamp")
    assert rows == [("/api/nothing", "failed"), ("/api/chat", "failed"), ("/api/chat", "failed"),
                    ("/api/pull", "failed"), ("/api/delete", "failed")]


def test_the_bearer_scheme_is_case_insensitive(make_router):
    router = make_router(api_key="sekrit")
    for header in ("Bearer sekrit", "bearer sekrit", "BEARER  sekrit"):
        assert requests.get(router.url + "/fleet/status", headers={"Authorization": header}).status_code == 200
    assert requests.get(router.url + "/fleet/status", headers={"Authorization": "Basic sekrit"}).status_code == 401


def test_a_key_that_is_not_ascii_is_matched_as_clients_send_it(make_router):
    router = make_router(api_key="sëcret")
    port = int(router.url.rsplit(":", 1)[1])
    # UTF-8, as clients send it; Latin-1 (a byte that is not UTF-8 reads as Latin-1); another key
    for key, status in (("sëcret".encode(), b"200"), ("sëcret".encode("latin-1"), b"200"), (b"secret", b"401")):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /fleet/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Authorization: Bearer " + key + b"\r\n\r\n")
            assert read_all(sock).split()[1] == status, key


def test_auto_pull_only_for_valid_model_references(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0})
    router = make_router(nodes=[("a", fake.url)])
    odd = post(router, "/api/chat", chat_with(model="no such/model!!"))
    assert odd.status_code == 404 and "llama3.2:latest" in odd.json()["error"] and "ollama pull" in odd.json()["error"]
    assert router.herd.pulls.snapshot() == []
    real = post(router, "/api/chat", chat_with(model="hf.co/user/repo:Q4_K_M"))
    assert real.status_code == 404 and "started pulling" in real.json()["error"]
    assert [p["model"] for p in router.herd.pulls.snapshot()] == ["hf.co/user/repo:Q4_K_M"]


def test_a_model_name_that_is_not_ascii_reaches_the_header_encoded(make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0, "lläma🦙:7b": 2.0}, loaded=["lläma🦙:7b"])
    router = make_router(nodes=[("a", fake.url)])
    response = chat(router, chat_with(model="lläma🦙:7b", stream=True))
    assert response.status_code == 200
    assert response.headers["X-Herd-Model"] == "ll%C3%A4ma%F0%9F%A6%99:7b"
    assert router.traces("SELECT status FROM request_traces") == [("completed",)]


# -- heartbeats -----------------------------------------------------------------------------

def ollama_block(fake, **changes):
    block = {"reachable": True, "version": "0.12.0", "models": [fake.tag_entry(m) for m in fake.models],
             "loaded": [fake.ps_entry(m) for m in fake.loaded]}
    block.update(changes)
    return block


def with_entry(fake, where, **changes):
    entry = (fake.ps_entry if where == "loaded" else fake.tag_entry)("llama3.2:latest")
    entry.update(changes)
    return {where: [entry]}


HEARTBEAT_CASES = [
    # (what, fields to send, the field the error names)
    ("version a number", lambda f: {"ollama": ollama_block(f, version=5)}, '"ollama.version"'),
    ("context_length a string", lambda f: {"ollama": ollama_block(f, **with_entry(f, "loaded", context_length="abc"))},
     '"ollama.loaded[0].context_length"'),
    ("model size a string", lambda f: {"ollama": ollama_block(f, **with_entry(f, "models", size="abc"))},
     '"ollama.models[0].size"'),
    ("models not a list", lambda f: {"ollama": ollama_block(f, models="all")}, '"ollama.models"'),
    ("a model not an object", lambda f: {"ollama": ollama_block(f, models=[5])}, '"ollama.models[0]"'),
    ("a model name a number", lambda f: {"ollama": ollama_block(f, **with_entry(f, "models", name=5, model=5))},
     '"ollama.models[0].name"'),
    ("a model name with CR LF", lambda f: {"ollama": ollama_block(f, **with_entry(f, "models", name="x\r\ny"))},
     '"ollama.models[0].name"'),
    ("memory_budget_gb an object", lambda f: {"memory_budget_gb": {}}, '"memory_budget_gb"'),
    ("memory_budget_gb a string", lambda f: {"memory_budget_gb": "1e9"}, '"memory_budget_gb"'),
    ("node id of 10,000 characters", lambda f: {"node_id": "n" * 10_000}, '"node_id"'),
    ("node id with a newline", lambda f: {"node_id": "a\nb"}, '"node_id"'),
    ("node id with NUL", lambda f: {"node_id": "a\x00b"}, '"node_id"'),
    ("node id with ESC", lambda f: {"node_id": "a\x1b[31mb"}, '"node_id"'),
    ("node id with U+202E", lambda f: {"node_id": "a\u202eb"}, '"node_id"'),
    ("blank node id", lambda f: {"node_id": "   "}, '"node_id"'),
    ("ollama_url with CR LF", lambda f: {"ollama_url": f.url + "\r\nX: 1"}, '"ollama_url"'),
    ("ollama_url with a space in the host", lambda f: {"ollama_url": "http://gpu box:11434"}, '"ollama_url"'),
    ("ollama_url not http", lambda f: {"ollama_url": "file:///etc/passwd"}, '"ollama_url"'),
    ("ollama_url with a bad port", lambda f: {"ollama_url": "http://host:99999"}, '"ollama_url"'),
    ("negative memory", lambda f: {"memory": {"total_gb": -1, "available_gb": 2}}, '"memory.total_gb"'),
    ("negative slots", lambda f: {"num_parallel": -2}, '"num_parallel"'),
    ("negative interval", lambda f: {"interval_s": -5}, '"interval_s"'),
    ("interval a string", lambda f: {"interval_s": "abc"}, '"interval_s"'),
    ("interval of 400 digits", lambda f: {"interval_s": int("9" * 400)}, '"interval_s"'),
    ("cpu_percent a string", lambda f: {"cpu_percent": "hot"}, '"cpu_percent"'),
    ("gpu a string", lambda f: {"gpu": "rtx"}, '"gpu"'),
    ("ollama not an object", lambda f: {"ollama": "up"}, '"ollama"'),
]

READS = ("/api/version", "/api/tags", "/api/ps", "/v1/models", "/fleet/status",
         "/dashboard/api/model-management", "/dashboard/api/settings")


@pytest.mark.parametrize("what, fields, names", HEARTBEAT_CASES, ids=[c[0] for c in HEARTBEAT_CASES])
def test_bad_heartbeats_are_refused_whole_and_break_nothing(make_fake, make_router, what, fields, names):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router()
    sent = fields(fake)
    response = heartbeat(router, sent.pop("node_id", "node-a"), fake, **sent)
    assert response.status_code == 400 and names in response.json()["error"], response.text
    assert router.status()["nodes"] == []  # nothing of it was applied
    for path in READS:
        assert requests.get(router.url + path, timeout=5).status_code == 200, path
    assert heartbeat(router, "node-a", fake).status_code == 200  # a good one still registers the node
    assert chat(router).status_code == 200
    assert router.herd.warmer.thread.is_alive() and router.herd.watchdog.thread.is_alive()


# -- settings, pulls and deletes from the dashboard ------------------------------------------

MANAGEMENT_CASES = [
    ("settings not an object", "/dashboard/api/settings", b'"x"', "a JSON object"),
    ("settings not JSON", "/dashboard/api/settings", b"{", "not valid JSON"),
    ("a setting of the wrong type", "/dashboard/api/settings", {"auto_pull": "yes"}, '"auto_pull"'),
    ("an unknown setting", "/dashboard/api/settings", {"turbo": True}, "unknown setting"),
    ("context_protection unknown", "/dashboard/api/settings", {"context_protection": "maybe"}, '"context_protection"'),
    ("pull body a list", "/dashboard/api/pull", [1], "a JSON object"),
    ("pull model a number", "/dashboard/api/pull", {"model": 5, "node_id": "a"}, '"model"'),
    ("pull node a list", "/dashboard/api/pull", {"model": "llama3.2", "node_id": ["a"]}, '"node_id"'),
    ("pull to an unknown node", "/dashboard/api/pull", {"model": "llama3.2", "node_id": "zz"}, "no node named zz"),
    ("Ollama pull model a list", "/api/pull", {"model": ["x"]}, '"model"'),
    ("Ollama pull not JSON", "/api/pull", b"pull please", "not valid JSON"),
]


@pytest.mark.parametrize("what, path, body, names", MANAGEMENT_CASES, ids=[c[0] for c in MANAGEMENT_CASES])
def test_bad_management_bodies_get_4xx_naming_the_field(fleet, what, path, body, names):
    _, router = fleet
    response = post(router, path, raw=body) if isinstance(body, bytes) else post(router, path, body)
    assert 400 <= response.status_code < 500 and names in error_text(response, "ollama"), response.text
    assert router.herd.settings["auto_pull"] is True
    assert router.herd.pulls.snapshot() == []


def test_a_model_with_odd_descriptions_is_kept_without_them(make_fake, make_router):
    # what a model entry only shows (digest, dates, details) never costs the node its report: a
    # 300-character digest and a family with a newline are left out, the model is served
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router()
    odd = dict(fake.tag_entry("llama3.2:latest"), digest="d" * 300,
               details={"family": "ll\nama", "format": "gguf", "x" * 200: "y", "families": ["llama", "f" * 129]})
    answer = heartbeat(router, "odd", fake, ollama={"reachable": True, "version": "0.12.0", "models": [odd],
                                                    "loaded": [fake.ps_entry("llama3.2:latest")]})
    assert answer.status_code == 200
    assert chat(router).status_code == 200
    (entry,) = [m for m in router.herd.fleet.nodes["odd"].models.values()]
    assert "digest" not in entry and entry["details"] == {"format": "gguf", "families": ["llama"]}


def test_a_utf16_body_and_utf8_tags_reach_the_node_and_the_trace_as_sent(make_fake, make_router):
    # a body in UTF-16 (or UTF-8 with a BOM) is valid JSON that Ollama refuses: herd forwards it
    # re-encoded in UTF-8; a tag header in UTF-8 is read as UTF-8, not as Latin-1 ("cafÃ©")
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("a", fake.url)])
    for encoded in (json.dumps(CHAT).encode("utf-16"), b"\xef\xbb\xbf" + json.dumps(CHAT).encode()):
        answer = post(router, "/api/chat", raw=encoded, headers={"X-Herd-Tags": "café, ✓".encode()})
        assert answer.status_code == 200, answer.text
    assert fake.received[-1][1]["messages"] == CHAT["messages"]
    assert [json.loads(tags) for tags, in router.traces("SELECT tags FROM request_traces")] == [["café", "✓"]] * 2


def nested(depth, container=list):
    """`depth` containers, one inside the other (a dict nests under the key "k")."""
    value = container()
    for _ in range(depth - 1):
        value = [value] if container is list else {"k": value}
    return value


TOO_DEEP = [
    # (what, value, deeper than MAX_JSON_DEPTH = 64?)
    ("a flat object", {"a": 1, "b": "x"}, False),
    ("64 lists", nested(64), False),
    ("65 lists", nested(65), True),
    ("65 objects", nested(65, dict), True),
    ("64 objects beside a deep-looking string", {"s": "[" * 100, "d": nested(63, dict)}, False),
    ("the deep one the last of many shallow ones", [nested(2)] * 500 + [nested(64)], True),
]


@pytest.mark.parametrize("what, value, deep", TOO_DEEP, ids=[row[0] for row in TOO_DEEP])
def test_too_deep(what, value, deep):
    assert herd.too_deep(value) is deep

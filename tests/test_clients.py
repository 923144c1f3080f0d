"""The official openai and ollama Python clients work against herd unchanged."""

import ollama
import openai
import pytest


@pytest.fixture
def fleet(make_fake, make_router):
    chat_node = make_fake(models={"llama3.2": 2.0, "nomic-embed-text": 0.3}, loaded=["llama3.2"])
    other = make_fake(models={"qwen2.5:7b": 4.5})
    router = make_router(nodes=[("a", chat_node.url), ("b", other.url)])
    return router, chat_node, other


def test_openai_client_chat_stream_completions_embeddings_models(fleet):
    router, *_ = fleet
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)

    reply = client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert reply.usage.completion_tokens == 5

    stream = client.chat.completions.create(model="qwen2.5:7b", stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "

    completion = client.completions.create(model="llama3.2", prompt="once upon")
    assert completion.choices[0].text.startswith("tok0")

    embedding = client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 8

    ids = {model.id for model in client.models.list()}
    assert ids == {"llama3.2:latest", "nomic-embed-text:latest", "qwen2.5:7b"}
    assert client.models.retrieve("qwen2.5:7b").id == "qwen2.5:7b"


def test_openai_client_sees_openai_shaped_errors(fleet):
    router, *_ = fleet
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="missing-model", messages=[{"role": "user", "content": "hi"}])
    assert "llama3.2:latest" in caught.value.message  # the error names what the fleet has
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing-model")


def test_ollama_client_chat_generate_embed_list_ps_show(fleet):
    router, *_ = fleet
    client = ollama.Client(host=router.url)
    running = client.ps().models
    assert [model.model for model in running] == ["llama3.2:latest"]
    assert running[0].context_length == 4096

    reply = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content == "tok0 tok1 tok2 tok3 tok4 " and reply.eval_count == 5

    parts = [part.message.content for part in
             client.chat(model="qwen2.5:7b", messages=[{"role": "user", "content": "hi"}], stream=True)]
    assert "".join(parts) == "tok0 tok1 tok2 tok3 tok4 " and len(parts) == 6

    assert client.generate(model="llama3.2", prompt="hi").response.startswith("tok0")
    streamed = list(client.generate(model="llama3.2", prompt="hi", stream=True))
    assert streamed[-1].done

    assert len(client.embed(model="nomic-embed-text", input=["x", "y", "z"]).embeddings) == 3
    assert len(client.embeddings(model="nomic-embed-text", prompt="x").embedding) == 8

    names = {model.model for model in client.list().models}
    assert names == {"llama3.2:latest", "nomic-embed-text:latest", "qwen2.5:7b"}
    assert {model.model for model in client.ps().models} == names  # everything served is now hot
    assert "completion" in client.show("llama3.2").capabilities


def test_ollama_client_raises_response_error_for_unknown_model(fleet):
    router, *_ = fleet
    client = ollama.Client(host=router.url)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="nothing-here", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404
    assert "qwen2.5:7b" in caught.value.error

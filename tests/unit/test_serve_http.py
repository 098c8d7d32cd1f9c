"""The OpenAI-compatible server, driven by the official ``openai`` client on 127.0.0.1: completions and chat
equal HF's greedy text (concurrent requests of different lengths, streamed or whole), stop strings and
max_tokens hold, a disconnect frees its batch slot, a full queue answers 429, malformed requests get OpenAI's
error JSON with a 4xx code, and /v1/models, /health, /metrics answer."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.unit._textmodels import Reference, make_folder

pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from flexspeed.serve import Engine, EngineOptions, load_text_model, load_tokenizer  # noqa: E402
from flexspeed.serve.app import build_app  # noqa: E402
from flexspeed.testing import free_port  # noqa: E402

NAME = "tiny-llama"


class Served:
    """An engine behind uvicorn in a thread, on a free 127.0.0.1 port; ``close()`` stops both."""

    def __init__(self, engine: Engine, name: str = NAME) -> None:
        self.engine, self.port = engine, free_port()
        config = uvicorn.Config(build_app(engine, name), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def raw(self, method: str, path: str, body: bytes | str | None = None) -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read().decode()
            kind = resp.getheader("content-type", "")
            return resp.status, json.loads(data) if kind.startswith("application/json") else data
        finally:
            conn.close()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.engine.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return make_folder(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="module")
def ref(llama) -> Reference:
    return Reference(llama)


@pytest.fixture(scope="module")
def served(llama):
    srv = Served(Engine(load_text_model(llama), load_tokenizer(llama), EngineOptions(max_num_seqs=4)).start())
    yield srv
    srv.close()


PROMPTS = ["Kalo mi ne", "Ruta so vi de po an el ka lo mi tavi", "Us", "Tavi mika or! Deso", "De po", "Anelor kaso"]


def test_completions_and_chat_equal_hf_greedy_text_concurrently(served, ref) -> None:
    client = served.client()
    chat = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]

    def completion(i: int) -> str:
        kw = dict(model=NAME, prompt=PROMPTS[i], max_tokens=5 + 4 * i, temperature=0)
        if i % 2:  # streamed: the chunks concatenate to the text
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return client.completions.create(**kw).choices[0].text

    def chatted(i: int) -> str:
        kw = dict(model=NAME, messages=chat[i], max_tokens=12, temperature=0)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
        return client.chat.completions.create(**kw).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:  # 9 requests on 4 slots: rows join and leave while others run
        texts = pool.map(completion, range(len(PROMPTS)))
        chats = pool.map(chatted, range(len(chat)))
        texts, chats = list(texts), list(chats)
    for i, text in enumerate(texts):
        assert text == ref.text(PROMPTS[i], 5 + 4 * i), f"prompt {i}"
    for i, text in enumerate(chats):
        assert text == ref.greedy(ref.chat_ids(chat[i]), 12)[0], f"chat {i}"


def test_usage_stop_strings_and_max_tokens(served, ref) -> None:
    client = served.client()
    prompt = PROMPTS[0]
    full = ref.text(prompt, 30)
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=7, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 7
    assert out.usage.prompt_tokens == len(ref.ids(prompt)) and out.usage.total_tokens == out.usage.prompt_tokens + 7
    stop = full[6:9]
    for stream in (False, True):
        kw = dict(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].text for c in chunks)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason][-1]
        else:
            choice = client.completions.create(**kw).choices[0]
            text, reason = choice.text, choice.finish_reason
        assert text == full[:full.index(stop)] and reason == "stop"
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 4


def test_n_choices_prompt_lists_echo_and_seeds(served, ref) -> None:
    client = served.client()
    out = client.completions.create(model=NAME, prompt=[PROMPTS[0], PROMPTS[2]], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [ref.text(PROMPTS[0], 6)] * 2 + [ref.text(PROMPTS[2], 6)] * 2
    echoed = client.completions.create(model=NAME, prompt=ref.ids(PROMPTS[1]), max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == ref.tok.decode(ref.ids(PROMPTS[1])) + ref.text(PROMPTS[1], 5)
    kw = dict(model=NAME, prompt=PROMPTS[3], max_tokens=10, temperature=1.2, top_p=0.95, seed=11)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b  # a seeded request samples the same text


def test_models_health_and_metrics(served) -> None:
    models = served.client().models.list()
    assert [m.id for m in models] == [NAME]
    assert served.raw("GET", "/health") == (200, {"status": "ok"})
    status, text = served.raw("GET", "/metrics")
    assert status == 200 and "# TYPE flexspeed_num_requests_waiting gauge" in text
    assert "flexspeed_generation_tokens_total" in text and "flexspeed_time_per_output_token_seconds_bucket" in text


@pytest.mark.parametrize("path,body,status,param,words", [
    ("/v1/completions", "{not json", 400, None, "not valid JSON"),
    ("/v1/completions", "[1, 2]", 400, None, "must be a JSON object"),
    ("/v1/completions", {"prompt": "hi", "max_tokns": 3}, 400, "max_tokns", "Did you mean 'max_tokens'"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "valid number"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "Field required"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", "must be in [0, 100]"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens", "maximum context length is 256"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop", "non-empty"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "Input"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools", "not supported"),
    ("/v1/nowhere", {}, 404, None, "no route"),
])
def test_malformed_requests_get_openai_error_json(served, path, body, status, param, words) -> None:
    raw = body if isinstance(body, str) else json.dumps(body)
    got, data = served.raw("POST", path, raw)
    assert got == status, data
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert err["param"] == param and words in err["message"], err
    assert "Traceback" not in err["message"]
    assert served.raw("GET", "/health")[0] == 200  # and the server is still up


def test_an_unexpected_failure_is_a_500_json_and_the_server_goes_on(served, monkeypatch) -> None:
    def broken(text: str) -> list[int]:
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(served.engine.tokenizer, "encode", broken)
    status, data = served.raw("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}))
    assert status == 500 and data["error"]["type"] == "server_error" and "tokenizer exploded" in data["error"]["message"]
    monkeypatch.undo()
    assert served.client().completions.create(model=NAME, prompt="Us", max_tokens=2).usage.completion_tokens == 2


def test_the_client_sees_openai_errors(served) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        served.client().completions.create(model=NAME, prompt="hi", max_tokens=10_000)


def test_chat_without_a_template_is_a_400(tmp_path) -> None:
    folder = make_folder(str(tmp_path), "opt", chat=False)
    srv = Served(Engine(load_text_model(folder), load_tokenizer(folder), EngineOptions(max_num_seqs=2)).start(), "opt")
    try:
        status, data = srv.raw("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}]}))
        assert status == 400 and "has no chat template" in data["error"]["message"]
        ref = Reference(folder)  # OPT goes through continuous batching too
        out = srv.client().completions.create(model="opt", prompt=PROMPTS[1], max_tokens=9, temperature=0)
        assert out.choices[0].text == ref.text(PROMPTS[1], 9)
    finally:
        srv.close()


def _slow(engine: Engine, seconds: float) -> None:
    """Make every engine step take at least ``seconds`` (so a request is still running when the test acts)."""
    real = engine.batcher.forward

    def forward():
        time.sleep(seconds)
        return real()

    engine.batcher.forward = forward


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_a_disconnect_frees_its_batch_slot(llama, ref) -> None:
    engine = Engine(load_text_model(llama), load_tokenizer(llama), EngineOptions(max_num_seqs=1))
    _slow(engine, 0.02)
    srv = Served(engine.start())
    try:
        client = srv.client()
        stream = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        for _, _chunk in zip(range(3), stream):
            pass
        with pytest.raises(openai.APITimeoutError):  # waits behind the stream (one slot), then gives up
            srv.client(timeout=0.5).completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=5, temperature=0)
        stream.close()
        _wait_for(lambda: engine.metrics.finished.get("abort", 0) == 2)  # the waiting one and the streaming one
        assert engine.batcher.running() == 0 and engine.metrics.generation_tokens < 200
        out = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=5, temperature=0)
        assert out.choices[0].text == ref.text(PROMPTS[2], 5)  # the freed slot serves the next request
    finally:
        srv.close()


def test_a_full_queue_answers_429(llama) -> None:
    engine = Engine(load_text_model(llama), load_tokenizer(llama), EngineOptions(max_num_seqs=1, max_queue=2))
    srv = Served(engine)  # the worker is not started yet: requests wait in the queue
    try:
        client = srv.client()
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(client.completions.create, model=NAME, prompt="Kalo", max_tokens=3, temperature=0)
                       for _ in range(2)]
            _wait_for(lambda: engine._n_waiting == 2)
            status, data = srv.raw("POST", "/v1/completions", json.dumps({"prompt": "Kalo", "max_tokens": 3}))
            assert status == 429 and data["error"]["type"] == "rate_limit_exceeded" and "max_queue=2" in data["error"]["message"]
            assert "flexspeed_request_rejected_total 1" in srv.raw("GET", "/metrics")[1]
            engine.start()
            assert all(f.result(timeout=60).choices[0].finish_reason for f in waiting)
    finally:
        srv.close()

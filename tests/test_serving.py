"""Serving smoke test: real Ray Serve, real HTTP, the official openai client, a real (temporary) MLflow registry.

The server is deployed once for the module from `models:/tiny-chat@champion`, so model resolution through the
registry is exercised end to end; the model is a random debug network (its text is noise, but greedy decoding is
deterministic, which is all the assertions need).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlflow
import openai
import pytest
from mlflow import MlflowClient
from ray import serve

from components.serve.app import API_KEY_ENV, MODEL_URI_ENV, AppArgs, ChatServer, build_app
from components.serve.engine import Engine
from components.serve.jobs import Prepared
from components.serve.protocol import APIError
from components.serve.resolve import HASHES_FILE, pin_version, resolve_checkpoint
from model.chat import encode_prompt
from model.checkpoint import CheckpointError, save_checkpoint
from model.generation import SamplingParams
from tests.helpers import debug_model, small_tokenizer

REGISTERED = "tiny-chat"
SERVED = "llama2-chat"
MESSAGES = [{"role": "system", "content": "Always reply in uppercase."},
            {"role": "user", "content": "what is the quick brown fox"}]
MAX_BODY = 64 * 1024
JSON = {"content-type": "application/json"}


class _Noop(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


def register_model(root, model, tokenizer) -> tuple:
    """A checkpoint of `model`, registered as a pyfunc model whose artifacts hold it, in a new MLflow store under
    root; alias `champion` on version 1. Returns (checkpoint, tracking URI, root): what deploy() takes."""
    checkpoint = save_checkpoint(root / "checkpoint", model, tokenizer)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("serving-test", artifact_location=(root / "mlartifacts").as_uri())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        try:
            with mlflow.start_run(experiment_id=experiment_id):
                info = mlflow.pyfunc.log_model(name="model", python_model=_Noop(), pip_requirements=[],
                                               artifacts={"checkpoint": str(checkpoint)},
                                               registered_model_name=REGISTERED)
        finally:
            mlflow.set_tracking_uri(None)  # back to the environment's URI (the monkeypatch restores it)
    client.set_registered_model_alias(REGISTERED, "champion", info.registered_model_version)
    return checkpoint, tracking_uri, root


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A tiny debug checkpoint, registered (register_model)."""
    tokenizer = small_tokenizer()
    return register_model(tmp_path_factory.mktemp("serving"), debug_model(tokenizer.vocab_size), tokenizer)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def deploy(registry, **args):
    """Serve the registered model on a free loopback port with AppArgs `args`; yield the base URL; shut Serve down
    after."""
    _, tracking_uri, root = registry
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(MODEL_URI_ENV, raising=False)  # the env override would win over model_uri
        mp.delenv(API_KEY_ENV, raising=False)
        app = build_app({"model_uri": f"models:/{REGISTERED}@champion", "tracking_uri": tracking_uri,
                         "cache_dir": str(root / "cache"), "model_name": SERVED} | args)
    try:
        serve.run(app, name="chat", route_prefix="/", blocking=False)
        deadline = time.monotonic() + 120
        while serve.status().applications["chat"].status != "RUNNING":
            assert time.monotonic() < deadline, serve.status()
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def server(ray_local, registry):
    """Base URL of the deployed app; Serve is shut down after the module."""
    with deploy(registry, max_request_bytes=MAX_BODY) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="dummy", max_retries=0, timeout=60)


def _chat(client, **kwargs):
    kwargs = {"model": SERVED, "messages": MESSAGES, "temperature": 0} | kwargs
    return client.chat.completions.create(**kwargs)


def _stream_text(client, **kwargs):
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish, chunks[-1].usage


def test_openai_client_non_streaming_and_streaming(client):
    reply = _chat(client, max_tokens=8)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == SERVED and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.message.content and choice.finish_reason == "length"
    prompt_tokens = len(encode_prompt(small_tokenizer(), MESSAGES))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt_tokens, 8, prompt_tokens + 8)

    text, finish, usage = _stream_text(client, max_tokens=8)
    assert text == choice.message.content and finish == ["length"]  # greedy: same answer, delivered in pieces
    assert usage == reply.usage


def test_stream_is_openai_sse_ending_with_done(server):
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [SERVED]
    assert client.models.retrieve(SERVED).id == SERVED
    health = httpx.get(f"{server}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_stop_strings_cut_the_text(client):
    full = _chat(client, max_tokens=24).choices[0].message.content
    match = re.search(r"[a-z]{2}", full[3:])  # a stop string from the model's own (noisy) text
    assert match, full
    stop = match.group()
    expected = full[:full.index(stop)]
    reply = _chat(client, max_tokens=24, stop=[stop, "never-appears"])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 24  # generation ended at the stop string, not at max_tokens
    text, finish, _ = _stream_text(client, max_tokens=24, stop=stop)
    assert (text, finish) == (expected, ["stop"])


def test_concurrent_requests_match_sequential_ones(client):
    # Rows join the engine's running batch together; greedy rows must not change.
    prompts = [[{"role": "user", "content": q}] for q in ("hello", "what is the river", "dax", "how do I kill a fox")]
    alone = [_chat(client, messages=m, max_tokens=6).choices[0].message.content for m in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda m: _chat(client, messages=m, max_tokens=6).choices[0].message.content, prompts))
    assert together == alone


def test_completions_n_logprobs_and_seed(client):
    reply = client.completions.create(model=SERVED, prompt="the quick brown fox", max_tokens=6, temperature=0,
                                      logprobs=0)
    choice = reply.choices[0]
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-") and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 6 and len(choice.logprobs.token_logprobs) == 6
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs) and choice.text
    ids = small_tokenizer().encode("the quick brown fox", bos=True)
    by_ids = client.completions.create(model=SERVED, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == choice.text and by_ids.usage.prompt_tokens == len(ids)
    streamed = list(client.completions.create(model=SERVED, prompt=ids, max_tokens=6, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    assert streamed[-1].usage.completion_tokens == 6

    seeded = [client.completions.create(model=SERVED, prompt="a", max_tokens=8, temperature=1.5, seed=7, n=3)
              for _ in range(2)]
    texts = [[c.text for c in r.choices] for r in seeded]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # seeded: reproducible, yet n different choices
    assert [c.index for c in seeded[0].choices] == [0, 1, 2] and seeded[0].usage.completion_tokens == 24

    # No temperature / top_p: Llama 2 chat's 0.6 / 0.9 (model.chat.SAMPLING_DEFAULTS), not OpenAI's 1.0 / 1.0.
    plain = dict(model=SERVED, messages=MESSAGES, max_tokens=12, seed=3, n=4)
    default = [c.message.content for c in client.chat.completions.create(**plain).choices]
    assert default == [c.message.content for c in client.chat.completions.create(
        **plain, temperature=0.6, top_p=0.9).choices]
    assert default != [c.message.content for c in client.chat.completions.create(
        **plain, temperature=1.0, top_p=1.0).choices]
    chat = _chat(client, max_tokens=5, logprobs=True, n=2)
    assert [len(c.logprobs.content) for c in chat.choices] == [5, 5] and chat.choices[0].message.content
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same twice
    assert _chat(client, max_completion_tokens=3).usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError, match="response_format"):
        _chat(client, max_tokens=2, response_format={"type": "json_object"})


def test_top_logprobs_shapes(client):
    chat = _chat(client, max_tokens=4, logprobs=True, top_logprobs=3).choices[0]
    assert len(chat.logprobs.content) == 4
    for entry in chat.logprobs.content:
        tops = entry.top_logprobs
        assert len(tops) == 3 and tops[0].logprob >= tops[1].logprob >= tops[2].logprob
        assert tops[0].token == entry.token and tops[0].logprob == pytest.approx(entry.logprob)  # greedy: the best
        assert all(isinstance(t.bytes, list) for t in tops)
    text = client.completions.create(model=SERVED, prompt="the quick brown fox", max_tokens=5, temperature=0,
                                     logprobs=2).choices[0]
    assert len(text.logprobs.top_logprobs) == 5 and all(1 <= len(d) <= 2 for d in text.logprobs.top_logprobs)
    assert all(max(d.values()) == pytest.approx(lp) for d, lp in zip(text.logprobs.top_logprobs,
                                                                       text.logprobs.token_logprobs))
    assert client.completions.create(model=SERVED, prompt="fox", max_tokens=2, logprobs=0).choices[
        0].logprobs.top_logprobs is None


def test_concurrent_requests_with_different_params_match_alone(client):
    """Greedy, seeded top-p, stop strings, n and lengths decoded in one running batch: each as it is alone."""
    kinds = [dict(max_tokens=5), dict(max_tokens=9, temperature=0.9, top_p=0.8, seed=3),
             dict(max_tokens=7, temperature=1.3, seed=11, n=2), dict(max_tokens=12, stop=["e"]),
             dict(max_tokens=3, temperature=0.5, seed=5, logprobs=True, top_logprobs=2)]
    requests = [dict(k, messages=[{"role": "user", "content": q}])
                for q in ("hello", "the river") for k in kinds]

    def answer(kwargs):
        reply = _chat(client, **kwargs)
        return [(c.message.content, c.finish_reason) for c in reply.choices], reply.usage.completion_tokens

    alone = [answer(r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(answer, requests))
    assert together == alone


def test_stream_sends_the_first_token_while_the_rest_decodes(server):
    """The first token's text arrives while its row is still in the engine's batch (not at the end)."""
    room = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["max_model_len"] - 16
    body = {"model": SERVED, "prompt": [1, 5], "max_tokens": room, "temperature": 0, "stream": True}
    running, chunks = None, 0
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
                if running is None and json.loads(line[6:])["choices"][0]["text"]:
                    metrics = httpx.get(f"{server}/metrics", timeout=10).text
                    running = float(re.search(r"^llama2_serve_running_rows (\S+)$", metrics, re.M).group(1))
    assert running is not None and running >= 1 and chunks > 2


def test_metrics_count_requests_and_tokens(server, client):
    _chat(client, max_tokens=3)
    text = httpx.get(f"{server}/metrics", timeout=10).text
    for name in ("llama2_serve_requests_total", "llama2_serve_generated_tokens_total", "llama2_serve_queue_depth",
                 "llama2_serve_running_rows", "llama2_serve_batch_occupancy", "llama2_serve_engine_tokens_total",
                 "llama2_serve_engine_steps_total", "llama2_serve_time_to_first_token_seconds_bucket"):
        assert name in text, name
    assert 'route="/v1/chat/completions",status="200"' in text


MALFORMED = {
    "bad json": b'{"messages": [',
    "not an object": b"[1, 2]",
    "nested too deep": b"[" * 50_000,
    "missing messages": {"model": SERVED},
    "empty messages": {"messages": []},
    "wrong role": {"messages": [{"role": "robot", "content": "hi"}]},
    "roles out of order": {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}]},
    "ends with assistant": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    "non-text content": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    "max_tokens 0": {"messages": MESSAGES, "max_tokens": 0},
    "max_tokens past context": {"messages": MESSAGES, "max_tokens": 10 ** 6},
    "max_tokens not a number": {"messages": MESSAGES, "max_tokens": "many"},
    "prompt too long": {"messages": [{"role": "user", "content": "the quick brown fox " * 100}]},
    "negative temperature": {"messages": MESSAGES, "temperature": -1},
    "top_p 0": {"messages": MESSAGES, "top_p": 0},
    "n past 16": {"messages": MESSAGES, "n": 17},
    "tools": {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
    "unknown field": {"messages": MESSAGES, "temprature": 0.5},
    "empty stop": {"messages": MESSAGES, "stop": ""},
    "unknown model": {"model": "gpt-17", "messages": MESSAGES},
}


def _assert_openai_error(response: httpx.Response, status: int | None = None):
    assert 400 <= response.status_code < 500 and (status is None or response.status_code == status), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_malformed_requests_get_4xx_json_and_the_server_keeps_serving(server, client):
    url = f"{server}/v1/chat/completions"
    with httpx.Client(timeout=30) as http:
        for case, body in MALFORMED.items():
            response = http.post(url, **({"content": body, "headers": JSON} if isinstance(body, bytes)
                                         else {"json": body}))
            assert response.status_code < 500, case
            _assert_openai_error(response, 404 if case == "unknown model" else 400)
        _assert_openai_error(http.post(url, content=b" " * (MAX_BODY + 1), headers=JSON), 413)
        huge = {"messages": [{"role": "user", "content": "x" * (4 * MAX_BODY)}]}
        _assert_openai_error(http.post(url, json=huge), 413)
        _assert_openai_error(http.get(f"{server}/v1/nowhere"), 404)
        _assert_openai_error(http.get(url), 405)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _chat(client, temperature=-0.5)
    assert _chat(client, max_tokens=2).usage.completion_tokens == 2  # still serving


def test_resolve_checkpoint_paths_and_registry(registry, tmp_path):
    checkpoint, tracking_uri, root = registry
    assert resolve_checkpoint(str(checkpoint)) == checkpoint
    by_version = resolve_checkpoint(f"models:/{REGISTERED}/1", tracking_uri, tmp_path / "cache")
    assert (by_version / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    assert resolve_checkpoint(f"models:/{REGISTERED}@champion", tracking_uri, tmp_path / "cache") == by_version
    with pytest.raises(CheckpointError, match="found 2"):
        for copy in ("a", "b"):
            save_checkpoint(tmp_path / "two" / copy, debug_model(small_tokenizer().vocab_size), small_tokenizer())
        resolve_checkpoint(str(tmp_path / "two"))
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unsupported model URI"):
        resolve_checkpoint(f"models:/{REGISTERED}", tracking_uri)
    assert pin_version(f"models:/{REGISTERED}@champion", tracking_uri) == f"models:/{REGISTERED}/1"
    for missing in (f"models:/{REGISTERED}@never-promoted", "models:/no-such-model@champion"):
        with pytest.raises(LookupError, match="promotion gate .* LLAMA2_MODEL_URI=checkpoints/chat"):
            resolve_checkpoint(missing, tracking_uri, tmp_path / "cache")
        with pytest.raises(LookupError, match="no such registered model or alias"):
            pin_version(missing, tracking_uri)
    cache = tmp_path / "cache"
    assert cache.stat().st_mode & 0o777 == 0o700 and len(list(cache.rglob(HASHES_FILE))) == 1
    weights = by_version / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")  # tampered: the hash check downloads it again
    again = resolve_checkpoint(f"models:/{REGISTERED}/1", tracking_uri, cache)
    assert (again / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()


def test_a_full_engine_queue_is_a_503_with_retry_after_and_cancels_the_rows_submitted():
    """No Ray: the replica's submit step on a real engine of one row and one queue place, asked for 16 choices."""
    tokenizer = small_tokenizer()
    engine = Engine(debug_model(tokenizer.vocab_size), tokenizer, max_batch_size=1, max_queued=1)
    replica = types.SimpleNamespace(engine=engine, args=AppArgs(retry_after_s=3))
    prepared = Prepared(prompt=[1, 5, 6], params=SamplingParams(max_new_tokens=50, temperature=0), n=16,
                        logprobs=False, top_logprobs=0, stop=[])
    try:
        with pytest.raises(APIError) as error:
            ChatServer.func_or_class._submit(replica, prepared)
        assert error.value.status == 503 and error.value.headers == {"Retry-After": "3"}
        assert error.value.body()["error"]["code"] == "overloaded"
        deadline = time.monotonic() + 30
        while (stats := engine.stats()).running + stats.queued:  # the rows it had submitted leave
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        assert stats.cancelled >= 1 and stats.finished == 0
    finally:
        engine.close()

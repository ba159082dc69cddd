"""Hostile input against one live server (loopback, real Ray Serve): every case gets a 4xx with OpenAI's JSON error
body, or a correct 200, and /health answers after it. Plus batch poisoning, long stop strings, a slow body, client
disconnects, and the API key and Host gates through the openai client."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.test_serving import MESSAGES, SERVED, deploy, registry  # noqa: F401 - registry is a fixture

KEY = "sk-hostile-test"
MAX_BODY = 32 * 1024
AUTH = {"authorization": f"Bearer {KEY}"}
JSON = {"content-type": "application/json"} | AUTH
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OK = {"messages": MESSAGES, "max_tokens": 4}
PROMPT = {"prompt": "the quick brown fox", "max_tokens": 4}


@pytest.fixture(scope="module")
def server(ray_local, registry):  # noqa: F811
    with deploy(registry, api_key=KEY, max_request_bytes=MAX_BODY, body_timeout_s=1.5,
                max_header_bytes=8192) as url:
        yield url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


def _with(**fields):
    return OK | fields


def _msg(content):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4}


# (route, body: dict -> JSON, bytes -> raw, headers over JSON's, expected status)
CASES = {
    # malformed JSON
    "bad json": (CHAT, b'{"messages": [', None, 400),
    "empty body": (CHAT, b"", None, 400),
    "array body": (CHAT, b"[1, 2]", None, 400),
    "string body": (CHAT, b'"hi"', None, 400),
    "null body": (CHAT, b"null", None, 400),
    "nested too deep": (CHAT, b"[" * 30_000, None, 400),
    "NaN": (CHAT, json.dumps(OK)[:-1].encode() + b', "temperature": NaN}', None, 400),
    "Infinity": (CHAT, json.dumps(OK)[:-1].encode() + b', "top_p": Infinity}', None, 400),
    "trailing garbage": (CHAT, json.dumps(OK).encode() + b"garbage", None, 400),
    "BOM": (CHAT, b"\xef\xbb\xbf" + json.dumps(OK).encode(), None, 400),
    "UTF-16 body": (CHAT, json.dumps(OK).encode("utf-16"), None, 400),
    "5000-digit number": (CHAT, json.dumps(OK)[:-1].encode() + b', "seed": 1' + b"0" * 5000 + b"}", None, 400),
    # wrong types
    "messages a string": (CHAT, {"messages": "hi"}, None, 400),
    "messages an object": (CHAT, {"messages": {"role": "user", "content": "hi"}}, None, 400),
    "content a number": (CHAT, _msg(5), None, 400),
    "role a number": (CHAT, {"messages": [{"role": 1, "content": "hi"}]}, None, 400),
    "temperature a string": (CHAT, _with(temperature="0.5"), None, 400),
    "temperature a bool": (CHAT, _with(temperature=True), None, 400),
    "max_tokens a float": (CHAT, _with(max_tokens=5.5), None, 400),
    "max_tokens a string": (CHAT, _with(max_tokens="4"), None, 400),
    "stream a string": (CHAT, _with(stream="yes"), None, 400),
    "stop a number": (CHAT, _with(stop=5), None, 400),
    "stop numbers": (CHAT, _with(stop=[1, 2]), None, 400),
    "n a string": (CHAT, _with(n="2"), None, 400),
    "seed a float": (CHAT, _with(seed=1.5), None, 400),
    "logprobs a string": (CHAT, _with(logprobs="true"), None, 400),
    "stream_options a string": (CHAT, _with(stream=True, stream_options="usage"), None, 400),
    "model a number": (CHAT, _with(model=7), None, 400),
    # out of range
    "temperature 2.1": (CHAT, _with(temperature=2.1), None, 400),
    "temperature negative": (CHAT, _with(temperature=-0.001), None, 400),
    "top_p 0": (CHAT, _with(top_p=0), None, 400),
    "top_p 1.5": (CHAT, _with(top_p=1.5), None, 400),
    "max_tokens 0": (CHAT, _with(max_tokens=0), None, 400),
    "max_tokens negative": (CHAT, _with(max_tokens=-5), None, 400),
    "max_tokens past context": (CHAT, _with(max_tokens=10 ** 6), None, 400),
    "max_completion_tokens past context": (CHAT, _with(max_completion_tokens=10 ** 9), None, 400),
    "n 0": (CHAT, _with(n=0), None, 400),
    "n 17": (CHAT, _with(n=17), None, 400),
    "seed 2**64": (CHAT, _with(seed=2 ** 64), None, 400),
    "seed below -2**63": (CHAT, _with(seed=-(2 ** 63) - 1), None, 400),
    "top_logprobs 21": (CHAT, _with(logprobs=True, top_logprobs=21), None, 400),
    "top_logprobs without logprobs": (CHAT, _with(top_logprobs=1), None, 400),
    "top_logprobs > 0": (CHAT, _with(logprobs=True, top_logprobs=2), None, 200),
    "five stops": (CHAT, _with(stop=list("abcde")), None, 400),
    "stop of 1001 chars": (CHAT, _with(stop="x" * 1001), None, 400),
    "empty stop": (CHAT, _with(stop=""), None, 400),
    "prompt too long": (CHAT, _msg("the quick brown fox " * 200), None, 400),
    # tiny temperatures (were 500s that failed the whole batch): greedy, 200
    "temperature 1e-40": (CHAT, _with(temperature=1e-40), None, 200),
    "temperature 5e-324": (CHAT, _with(temperature=5e-324), None, 200),
    "temperature 0.0009": (CHAT, _with(temperature=0.0009), None, 200),
    "top_p 1e-300": (CHAT, _with(top_p=1e-300, temperature=1), None, 200),
    # fields not served
    "tools": (CHAT, _with(tools=[{"type": "function", "function": {"name": "f"}}]), None, 400),
    "tool_choice": (CHAT, _with(tool_choice="auto"), None, 400),
    "functions": (CHAT, _with(functions=[{"name": "f"}]), None, 400),
    "response_format json": (CHAT, _with(response_format={"type": "json_object"}), None, 400),
    "logit_bias": (CHAT, _with(logit_bias={"1": 5}), None, 400),
    "presence_penalty 0.5": (CHAT, _with(presence_penalty=0.5), None, 400),
    "unknown field": (CHAT, _with(temprature=0.5), None, 400),
    "neutral penalties and nulls": (CHAT, _with(presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                                                user="u", seed=None, stop=None), None, 200),
    # unicode
    "lone surrogate in content": (CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', None, 400),
    "lone low surrogate": (CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', None, 400),
    "lone surrogate in stop": (CHAT, json.dumps(OK)[:-1].encode() + b', "stop": ["\\ud83d"]}', None, 400),
    "CESU-8 surrogate bytes": (CHAT, b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', None, 400),
    "invalid UTF-8 byte": (CHAT, b'{"messages": [{"role": "user", "content": "\xff"}]}', None, 400),
    "overlong UTF-8": (CHAT, b'{"messages": [{"role": "user", "content": "\xc0\xaf"}]}', None, 400),
    "surrogate pair escape": (CHAT, b'{"max_tokens": 4, "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}',
                              None, 200),
    "NUL in content": (CHAT, _msg("a\x00b"), None, 200),
    "emoji, RTL and combining": (CHAT, _msg("\U0001F600 \u05e9\u05dc\u05d5\u05dd e\u0301\u200d\ufeff"), None, 200),
    "control-token look-alikes": (CHAT, _msg("<s>[INST] <<SYS>> </s> [/INST]"), None, 200),
    "unicode stop": (CHAT, _with(stop=["\U0001F600", "\u00e9"]), None, 200),
    # completions
    "completions: no prompt": (COMPLETIONS, {"max_tokens": 4}, None, 400),
    "completions: id past vocab": (COMPLETIONS, {"prompt": [1, 10 ** 6]}, None, 400),
    "completions: negative id": (COMPLETIONS, {"prompt": [1, -3]}, None, 400),
    "completions: empty prompt": (COMPLETIONS, {"prompt": []}, None, 400),
    "completions: two prompts": (COMPLETIONS, {"prompt": ["a", "b"]}, None, 400),
    "completions: prompt of objects": (COMPLETIONS, {"prompt": [{"a": 1}]}, None, 400),
    "completions: logprobs 6": (COMPLETIONS, PROMPT | {"logprobs": 6}, None, 400),
    "completions: logprobs 2": (COMPLETIONS, PROMPT | {"logprobs": 2}, None, 200),
    "completions: echo": (COMPLETIONS, PROMPT | {"echo": True}, None, 400),
    "completions: suffix": (COMPLETIONS, PROMPT | {"suffix": "x"}, None, 400),
    "completions: prompt past context": (COMPLETIONS, {"prompt": [5] * 10_000}, None, 400),
    "completions: one prompt in a list": (COMPLETIONS, PROMPT | {"prompt": [[1, 5, 6]]}, None, 200),
    "completions: temperature 1e-40": (COMPLETIONS, PROMPT | {"temperature": 1e-40, "n": 2}, None, 200),
    # the request's shape
    "empty messages": (CHAT, {"messages": []}, None, 400),
    "roles out of order": (CHAT, {"messages": [{"role": "assistant", "content": "a"},
                                               {"role": "user", "content": "b"}]}, None, 400),
    "tool role": (CHAT, {"messages": [{"role": "tool", "content": "a"}]}, None, 400),
    "image part": (CHAT, _msg([{"type": "image_url", "image_url": {"url": "x"}}]), None, 400),
    "unknown model": (CHAT, _with(model="gpt-17"), None, 404),
    "body over the limit": (CHAT, _msg("x" * MAX_BODY), None, 413),
    # the gates
    "text/plain": (CHAT, json.dumps(OK).encode(), {"content-type": "text/plain"}, 415),
    "no content type": (CHAT, json.dumps(OK).encode(), {"content-type": ""}, 415),
    "form body": (CHAT, b"messages=hi", {"content-type": "application/x-www-form-urlencoded"}, 415),
    "json with charset": (CHAT, json.dumps(OK).encode(), {"content-type": "application/json; charset=utf-8"}, 200),
    "no API key": (CHAT, OK, {"authorization": ""}, 401),
    "wrong API key": (CHAT, OK, {"authorization": f"Bearer {KEY}x"}, 401),
    "Basic auth": (CHAT, OK, {"authorization": f"Basic {KEY}"}, 401),
    "foreign Host": (CHAT, OK, {"host": "evil.example"}, 421),
    "Host localhost with port": (CHAT, OK, {"host": "localhost:8000"}, 200),
    "Host [::1]": (CHAT, OK, {"host": "[::1]:8000"}, 200),
    "12 KB header": (CHAT, OK, {"x-filler": "a" * 12_000}, 431),
    "300 headers": (CHAT, OK, {f"x-h{i}": "v" * 30 for i in range(300)}, 431),
}


def _assert_openai_error(response: httpx.Response, status: int):
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def _assert_alive(http):
    assert http.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_request(http, case):
    route, body, headers, status = CASES[case]
    headers = JSON | (headers or {})
    headers = {k: v for k, v in headers.items() if v}
    kwargs = {"content": body} if isinstance(body, bytes) else {"content": json.dumps(body).encode()}
    response = http.post(route, headers=headers, **kwargs)
    if status == 200:
        assert response.status_code == 200, response.text[:500]
        reply = response.json()
        assert reply["choices"] and all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])
        assert reply["usage"]["completion_tokens"] >= 1
    else:
        _assert_openai_error(response, status)
    _assert_alive(http)


def test_routes_methods_and_open_paths(http, server):
    _assert_openai_error(http.get(CHAT, headers=AUTH), 405)
    _assert_openai_error(http.get("/v1/nowhere", headers=AUTH), 404)
    _assert_openai_error(http.post(CHAT, content=b" " * (MAX_BODY + 1), headers=JSON), 413)
    # a chunked body (no Content-Length) past the limit
    _assert_openai_error(http.post(CHAT, content=iter([b" " * 8192] * 8), headers=JSON), 413)
    _assert_openai_error(http.get("/v1/models"), 401)
    assert http.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == SERVED
    assert http.get("/health").status_code == 200  # open: probes carry no key
    assert "llama2_serve_requests_total" in http.get("/metrics", headers=AUTH).text
    # a header block past the HTTP server's own limit: refused (by uvicorn, before the app), and still serving
    try:
        assert 400 <= http.get("/health", headers={"x-big": "a" * 200_000}).status_code < 500
    except httpx.HTTPError:  # or the connection is closed on it
        pass
    _assert_alive(http)


def _post(server, body, route=CHAT):
    return httpx.post(server + route, json=body, headers=AUTH, timeout=60)


def test_batch_poisoning_fails_no_good_request(server, http):
    """Poison (the temperatures that were NaN) sent with good requests at once: every request is answered."""
    good = [_with(temperature=0, max_tokens=6, messages=[{"role": "user", "content": q}])
            for q in ("hello", "what is the river", "dax", "how do I kill a fox", "fox", "the end")]
    poison = [_with(temperature=t, max_tokens=6) for t in (1e-40, 5e-324, 1e-300, 1e-40)]
    alone = [_post(server, b).json()["choices"][0]["message"]["content"] for b in good]
    with ThreadPoolExecutor(len(good) + len(poison)) as pool:
        answers = list(pool.map(lambda b: _post(server, b), good + poison))
    assert [r.status_code for r in answers] == [200] * len(answers), [r.text[:200] for r in answers]
    assert [r.json()["choices"][0]["message"]["content"] for r in answers[:len(good)]] == alone
    _assert_alive(http)


def test_long_stop_strings_do_not_stall_the_server(server, http):
    long_stops = [c * 1000 for c in "abcd"]  # the most allowed: 4 stops of 1000 characters
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(_post, server, _with(stop=long_stops, max_tokens=64))
        slowest = 0.0
        while not answer.done():
            t0 = time.monotonic()
            _assert_alive(http)
            slowest = max(slowest, time.monotonic() - t0)
        assert answer.result().status_code == 200
    assert slowest < 1.0
    t0 = time.monotonic()  # the old stall: 4 x 150,000 characters, now refused at once
    _assert_openai_error(_post(server, _with(stop=["x" * 150_000] * 4)), 413)
    _assert_openai_error(_post(server, _with(stop=["x" * 7000] * 4)), 400)
    assert time.monotonic() - t0 < 5


def _raw(server, data: bytes) -> socket.socket:
    url = urlsplit(server)
    sock = socket.create_connection((url.hostname, url.port), timeout=15)
    sock.sendall(data)
    return sock


def _head(route: str, length: int, extra: str = "") -> bytes:
    return (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data and (part := sock.recv(65536)):
        data += part
    return data


def test_slow_body_gets_408_and_frees_the_slot(server, http):
    body = json.dumps(OK).encode()
    t0 = time.monotonic()
    with _raw(server, _head(CHAT, len(body)) + body[:10]) as sock:  # half a body, then silence
        reply = _read_until(sock, b"}}").decode(errors="replace")
    assert reply.startswith("HTTP/1.1 408"), reply[:200]
    assert '"request_timeout"' in reply and time.monotonic() - t0 < 10
    _assert_alive(http)


def _metric(http, name: str) -> float:
    for line in http.get("/metrics", headers=AUTH).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_client_disconnects_leave_the_server_serving(server, http):
    """Clients that leave mid-stream and right after sending: the server keeps answering. (That the decode stops
    for them: tests/test_serve_cancel.py, on a model whose answers are long enough to leave in the middle of.)"""
    room = http.get("/v1/models", headers=AUTH).json()["data"][0]["max_model_len"] - 32
    body = json.dumps(_with(max_tokens=room, stream=True, temperature=1.0,
                            messages=[{"role": "user", "content": "hi"}])).encode()
    with _raw(server, _head(CHAT, len(body)) + body) as sock:
        assert b"data: " in _read_until(sock, b"data: ")  # the stream has begun; the client leaves
    body = json.dumps(_with(max_tokens=room, messages=[{"role": "user", "content": "hi"}])).encode()
    _raw(server, _head(CHAT, len(body)) + body).close()  # non-streaming, gone at once
    assert _metric(http, "llama2_serve_cancelled_total") >= 0
    assert _post(server, _with(temperature=0)).json()["usage"]["completion_tokens"] == 4  # greedy: no early </s>
    _assert_alive(http)


def test_openai_client_every_route_with_the_api_key(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [SERVED]
    chat = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4, temperature=0)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 4
    streamed = list(client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=4, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    text = client.completions.create(model=SERVED, prompt="fox", max_tokens=4, temperature=0, n=2)
    assert len(text.choices) == 2 and text.usage.completion_tokens == 8
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f"}}])

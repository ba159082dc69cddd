"""Client-disconnect cancellation over HTTP (its own module: it deploys its own model, and Serve runs one app per
test module here)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from tests.helpers import debug_model, small_tokenizer
from tests.test_serve_hostile import AUTH, CHAT, KEY, _head, _metric, _post, _raw, _read_until
from tests.test_serving import deploy, register_model


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """A registered debug model with a 4096-token context that never writes eos when greedy: its eos output row is
    zero, so eos would need every other logit below 0."""
    tokenizer = small_tokenizer()
    model = debug_model(tokenizer.vocab_size, max_seq_len=4096)
    with torch.no_grad():
        model.output.weight[tokenizer.eos_id] = 0
    return register_model(tmp_path_factory.mktemp("endless"), model, tokenizer)


def test_a_client_that_leaves_mid_stream_frees_its_row_at_once(ray_local, endless):
    """Over HTTP: a streamed greedy answer of ~4000 tokens (several seconds of decode) whose client leaves after
    the first event is cancelled in the engine within seconds, and its decode stops there."""
    with deploy(endless, api_key=KEY) as url, httpx.Client(base_url=url, timeout=30) as http:
        room = http.get("/v1/models", headers=AUTH).json()["data"][0]["max_model_len"] - 32
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": room, "temperature": 0,
                           "stream": True}).encode()
        with _raw(url, _head(CHAT, len(body)) + body) as sock:
            assert b"data: " in _read_until(sock, b"data: ")  # the stream has begun; the client leaves
        left = time.monotonic()
        while _metric(http, "llama2_serve_engine_rows_cancelled_total") < 1:
            assert time.monotonic() - left < 10, "the row of a client that left was not cancelled"
            time.sleep(0.05)
        tokens = _metric(http, "llama2_serve_engine_tokens_total")
        time.sleep(0.5)
        assert _metric(http, "llama2_serve_engine_tokens_total") == tokens < room / 2  # stopped, far from the end
        assert _metric(http, "llama2_serve_cancelled_total") == 1
        # The control: read to the end, the same request decodes all `room` tokens (it does not stop by itself).
        done = _post(url, {**json.loads(body), "stream": False}).json()
        assert done["usage"]["completion_tokens"] == room and done["choices"][0]["finish_reason"] == "length"

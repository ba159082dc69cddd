"""The streaming path's pieces without a server: TextStream fed several ids at once, TokenRelay's hand-off."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from components.serve.app import TokenRelay
from components.serve.text import TextStream, detokenize
from tests.helpers import small_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


def _streamed(tokenizer, ids, stop, chunks):
    stream, out, at = TextStream(tokenizer, stop), [], 0
    for n in chunks:
        out.append(stream.push(*ids[at:at + n]))
        at += n
    return "".join(out) + stream.flush()


def test_pushing_ids_in_chunks_gives_the_text_of_pushing_them_one_by_one(tokenizer):
    rng = random.Random(0)
    text = "the quick brown fox jumps over the lazy dog. Zoë's café: naïve façade, 3 × 4 = 12 ✓"
    base = tokenizer.encode(text, bos=False)
    byte_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.sp.id_to_piece(i).startswith("<0x")]
    for trial in range(30):
        ids = [i if rng.random() > 0.2 else rng.choice(byte_ids) for i in base]  # partial UTF-8 sequences too
        stop = [] if trial % 3 == 0 else [rng.choice(["fox", "lazy d", "café", "12", "never there"])]
        one_by_one = _streamed(tokenizer, ids, stop, [1] * len(ids))
        chunks, left = [], len(ids)
        while left:
            chunks.append(min(left, rng.randint(1, 6)))
            left -= chunks[-1]
        assert _streamed(tokenizer, ids, stop, chunks) == one_by_one
        assert "".join(detokenize(tokenizer, ids, "length", stop)[0]) == one_by_one


def test_relay_wakes_the_loop_once_per_batch_and_keeps_order():
    async def main():
        loop = asyncio.get_running_loop()
        relay, queues = TokenRelay(loop), [asyncio.Queue(), asyncio.Queue()]
        wakeups, scheduled = [], loop.call_soon_threadsafe

        def counting(callback, *args):
            wakeups.append(callback)
            return scheduled(callback, *args)

        loop.call_soon_threadsafe = counting  # the relay's own loop attribute is this loop
        done = asyncio.Event()

        def decode_thread():  # one "step": a token for each row, then the result, as the engine does
            for step in range(50):
                for q, queue in enumerate(queues):
                    relay.put(queue, (q, step))
            loop.call_soon_threadsafe(done.set)

        thread = threading.Thread(target=decode_thread)
        thread.start()
        await done.wait()
        thread.join()
        for q, queue in enumerate(queues):  # everything is there once the later callback has run
            assert [queue.get_nowait() for _ in range(queue.qsize())] == [(q, step) for step in range(50)]
        return len([w for w in wakeups if w == relay._drain])

    drains = asyncio.run(main())
    assert 1 <= drains < 100  # fewer wake-ups than tokens (one per token would be 100)

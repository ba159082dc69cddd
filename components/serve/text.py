"""Generated ids to text: incremental SentencePiece detokenisation, cut at the first stop string."""

from model.tokenizer import Tokenizer


class TextStream:
    """Turn generated ids, fed one at a time, into text that is safe to show, cut at the first stop string.

    SentencePiece text is not a concatenation of per-id strings (the first piece loses its leading space, and
    byte-fallback ids only form a character together), so each step decodes a short window of ids and emits what it
    adds (vLLM's incremental detokenization). Text that could still become a stop string is held back.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0  # window ids[prefix_offset:]; ids[:read_offset] are in self.text
        self.text = ""  # the text so far (cut at the stop string once one appeared)
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The rest of the text once generation has ended."""
        return "" if self.stopped else self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(window) > len(prefix) and (final or not window.endswith("\ufffd")):  # else: a partial UTF-8 char
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=1) + 1)
            self.text += window[len(prefix):]
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text, self.stopped, final = self.text[:min(hits)], True, True
        held = 0 if final else max((h for s in self.stop for h in range(1, len(s)) if self.text.endswith(s[:h])),
                                   default=0)
        out = self.text[self.sent:len(self.text) - held]
        self.sent += len(out)
        return out


def detokenize(tokenizer: Tokenizer, tokens: list[int], finish_reason: str, stop: list[str],
               ) -> tuple[list[str], int, str]:
    """A finished generation's text pieces (one per id that adds text), ids used (up to eos or the stop string) and
    finish reason ("stop" when a stop string cut it)."""
    stream, pieces = TextStream(tokenizer, stop), []
    for i, token_id in enumerate(tokens):
        if token_id == tokenizer.eos_id:
            break
        pieces.append(stream.push(token_id))
        if stream.stopped:
            return [p for p in pieces if p], i + 1, "stop"
    pieces.append(stream.flush())
    return [p for p in pieces if p], len(tokens), finish_reason

"""Generated ids to text: incremental SentencePiece detokenisation, cut at the first stop string."""

from model.tokenizer import Tokenizer


class StopMatcher:
    """Knuth-Morris-Pratt automaton of one stop sequence (a string's characters, or token ids): fed the output a
    symbol at a time, it knows the longest prefix of the stop sequence that the output ends with, in amortised O(1) a
    symbol (linear in the output and the stop sequence, however long either is)."""

    def __init__(self, stop):
        self.stop, self.matched = stop, 0
        self.fail = [0] * len(stop)  # fail[i]: the longest proper border of stop[:i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            k += stop[i] == stop[k]
            self.fail[i] = k

    def feed(self, symbol) -> bool:
        """Advance over one symbol; True when the output now ends with the whole stop sequence."""
        k = self.matched
        if k == len(self.stop):
            k = self.fail[k - 1]
        while k and symbol != self.stop[k]:
            k = self.fail[k - 1]
        self.matched = k + (symbol == self.stop[k])
        return self.matched == len(self.stop)


class TextStream:
    """Turn generated ids, fed one at a time, into text that is safe to show, cut at the first stop string.

    SentencePiece text is not a concatenation of per-id strings (the first piece loses its leading space, and
    byte-fallback ids only form a character together), so each step decodes a short window of ids and emits what it
    adds (vLLM's incremental detokenization). Text that could still become a stop string is held back. The stop
    string that ends first wins (a stream cannot wait for a longer one that might start earlier).
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.matchers = [StopMatcher(s) for s in stop]
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0  # window ids[prefix_offset:]; ids[:read_offset] are in self.text
        self.text = ""  # the text so far (cut at the stop string once one appeared)
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, *token_ids: int) -> str:
        """The text the ids add (several at once: one decode for all of them, the same text in the end)."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The rest of the text once generation has ended."""
        return "" if self.stopped else self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(window) > len(prefix) and (final or not window.endswith("\ufffd")):  # else: a partial UTF-8 char
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._append(window[len(prefix):])
            final = final or self.stopped
        held = 0 if final else max((m.matched for m in self.matchers), default=0)
        out = self.text[self.sent:len(self.text) - held]
        self.sent += len(out)
        return out

    def _append(self, new: str) -> None:
        for i, char in enumerate(new):
            for m in self.matchers:
                if m.feed(char):
                    self.text = (self.text + new[:i + 1])[:len(self.text) + i + 1 - len(m.stop)]
                    self.stopped = True
                    return
        self.text += new


def detokenize(tokenizer: Tokenizer, tokens: list[int], finish_reason: str, stop: list[str],
               ) -> tuple[list[str], int, str]:
    """A finished generation's text, one piece per id up to eos or the stop string ("" for an id that adds no text
    yet: pieces[i] belongs to tokens[i]), the ids used (eos counted) and the finish reason ("stop" when a stop string
    cut it)."""
    stream, pieces = TextStream(tokenizer, stop), []
    for i, token_id in enumerate(tokens):
        if token_id == tokenizer.eos_id:
            break
        pieces.append(stream.push(token_id))
        if stream.stopped:
            return pieces, i + 1, "stop"
    if pieces:
        pieces[-1] += stream.flush()
    return pieces, len(tokens), finish_reason

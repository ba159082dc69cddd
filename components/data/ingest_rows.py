"""The data stage's formats (components/data/ingest.py documents them): one record of a real source -> the rows of
the world's table it feeds."""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING

from components.data.ingest_files import RecordError
from components.data.oracle import RATINGS

if TYPE_CHECKING:
    from components.data.ingest import Source

REAL_TASK = "real"
FORMATS = {  # format -> tables it may feed, the default first (None: `table` is required)
    "text": ("pretrain",),
    "alpaca": ("sft", "rl_prompts"),
    "messages": ("sft", "rl_prompts"),
    "prefs": (None, "prefs_helpful", "prefs_safety"),
    "hh_rlhf": (None, "prefs_helpful", "prefs_safety"),
    "harmful": ("rl_prompts",),
}
DEFAULT_COLUMN = {"text": "text", "harmful": "prompt"}  # formats whose field is configurable (`column`)
FORMAT_KEYS = {"text": {"paragraphs", "column"}, "harmful": {"column"}, "messages": {"column"}}  # format-only keys
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}


def real_item(prompt: list[dict]) -> str:
    """A real row's item (real sources name none): a hash of its prompt, so rows asking the same fall together."""
    return "real:" + hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


def header_columns(src: Source) -> tuple[str, ...]:
    """The fields a headed container (Parquet, CSV, a HF dataset) must have for this source."""
    if src.format in DEFAULT_COLUMN:
        return (src.column or DEFAULT_COLUMN[src.format],)
    if src.format == "messages":
        return (src.column,) if src.column else ()  # else either messages or conversations, checked per record
    return {"alpaca": ("instruction", "output"), "prefs": ("chosen", "rejected"),
            "hh_rlhf": ("chosen", "rejected")}[src.format]


def _field(record, key: str, kinds=(str,)):
    if not isinstance(record, dict):
        raise RecordError(f"expected an object, got {type(record).__name__}")
    if key not in record:
        raise RecordError(f"no {key!r} field (fields: {sorted(record)})")
    value = record[key]
    if not isinstance(value, kinds):
        raise RecordError(f"{key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    return value


def _nonempty(text: str, what: str) -> str:
    if not text.strip():
        raise RecordError(f"empty {what}")
    return text


def _dialog(messages, ends_with: str | None) -> list[dict]:
    """Check a conversation fits the Llama 2 chat format (model/chat.py): optional system, then user/assistant
    alternating from a user turn, ending with `ends_with` (None: either)."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RecordError("the message list is a string that is not JSON") from None
    if not isinstance(messages, list) or not messages:
        raise RecordError("expected a non-empty list of messages")
    dialog = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError(f"message {n} is not an object")
        role, content = (m.get("role"), m.get("content")) if "role" in m else (m.get("from"), m.get("value"))
        role = SHAREGPT_ROLES.get(str(role).lower()) if role is not None else None
        if role is None or not isinstance(content, str):
            raise RecordError(f"message {n} must have role/content (or from/value) with a known role "
                            f"({sorted(SHAREGPT_ROLES)}) and text content, got {m!r}"[:300])
        dialog.append({"role": role, "content": content})
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    for n, m in enumerate(turns):
        if m["role"] != ("user" if n % 2 == 0 else "assistant"):
            raise RecordError(f"roles out of order at turn {n} ({m['role']}): after an optional system prompt, user "
                            "and assistant must alternate from a user turn")
    if not turns or ends_with and turns[-1]["role"] != ends_with:
        raise RecordError(f"the conversation must end with a{'n' if ends_with == 'assistant' else ''} {ends_with} turn")
    return dialog


def _answer(value, side: str) -> tuple[str, list[dict] | None]:
    """A preference side: a plain answer, one message (LLaMA-Factory's ShareGPT layout: {"from": "gpt", "value"}),
    or a conversation ending with the answer -> (answer, its prefix)."""
    if isinstance(value, str):
        return _nonempty(value, side), None
    if isinstance(value, dict):
        value = [value]
    alone = len(value) == 1  # TRL's explicit-prompt style: [{assistant message}], the prompt given apart
    dialog = _dialog([{"role": "user", "content": ""}] + value if alone else value, "assistant")
    return _nonempty(dialog[-1]["content"], side), None if alone else dialog[:-1]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def _hh_dialog(text: str, side: str) -> list[dict]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise RecordError(f"{side} does not start with '\\n\\nHuman: '")
    return _dialog([{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
                    for who, body in zip(parts[1::2], parts[2::2])], "assistant")


def record_rows(src: Source, record) -> list[dict]:
    """The table rows (without pretrain's doc_id) of one record; RecordError when it does not fit."""
    fmt, table = src.format, src.table
    if fmt == "text":
        text = record if isinstance(record, str) else _field(record, src.column or "text")
        docs = [p.strip() for p in re.split(r"\n[ \t]*\n", text)] if src.paragraphs else [text]
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise RecordError("empty document")
        return [{"text": d, "planted": None, "pii_kinds": None, "item": ""} for d in docs]
    if fmt == "harmful":
        prompt = [{"role": "user", "content": _nonempty(_field(record, src.column or "prompt"), "prompt").strip()}]
        return [{"prompt": json.dumps(prompt), "task": REAL_TASK, "is_safety": True, "reference": "{}",
                 "item": real_item(prompt)}]
    if fmt in ("alpaca", "messages"):
        if fmt == "alpaca":
            user = _nonempty(_field(record, "instruction"), "instruction").strip()
            extra = record.get("input") or ""
            if not isinstance(extra, str):
                raise RecordError(f"'input' must be a string, got {type(extra).__name__}")
            user += f"\n\n{extra.strip()}" if extra.strip() else ""
            dialog = [{"role": "user", "content": user},
                      {"role": "assistant", "content": _nonempty(_field(record, "output"), "output")}]
        else:
            key = src.column or ("messages" if isinstance(record, dict) and "messages" in record else "conversations")
            dialog = _dialog(_field(record, key, (list, str)), "assistant" if table == "sft" else None)
        if table == "sft":
            return [{"messages": json.dumps(dialog), "task": REAL_TASK, "item": real_item(dialog[:-1])}]
        prompt = _dialog(dialog[:-1] if dialog[-1]["role"] == "assistant" else dialog, "user")
        return [{"prompt": json.dumps(prompt), "task": REAL_TASK, "is_safety": False, "reference": "{}",
                 "item": real_item(prompt)}]
    # preference pairs
    if fmt == "hh_rlhf":
        chosen = _hh_dialog(_field(record, "chosen"), "chosen")
        rejected = _hh_dialog(_field(record, "rejected"), "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise RecordError("chosen and rejected differ before their final answers")
        prompt, answers, rating = chosen[:-1], (chosen[-1]["content"], rejected[-1]["content"]), None
        if not prompt:
            raise RecordError("no Human turn before the final answer")
        for side, answer in zip(("chosen", "rejected"), answers):
            _nonempty(answer, f"{side} answer")
    else:
        (chosen, c_prefix), (rejected, r_prefix) = (_answer(_field(record, k, (str, list, dict)), k)
                                                    for k in ("chosen", "rejected"))
        given = record.get("prompt")
        if given is None and "conversations" in record:  # LLaMA-Factory's ShareGPT preference layout
            given = _field(record, "conversations", (list, str))
            if record.get("system"):
                given = [{"role": "system", "content": _field(record, "system")}] + _dialog(given, "user")
        if isinstance(given, str):
            given = [{"role": "user", "content": _nonempty(given, "prompt")}]
        elif given is not None:
            given = _dialog(given, "user")
        candidates = [p for p in (given, c_prefix, r_prefix) if p]
        if not candidates:
            raise RecordError("no prompt: give a 'prompt' field, or chosen/rejected as conversations")
        if any(p != candidates[0] for p in candidates):
            raise RecordError("the prompt, and the conversations before the chosen and rejected answers, differ")
        prompt, answers = _dialog(candidates[0], "user"), (chosen, rejected)
        rating = record.get("rating")
        if rating is not None and rating not in RATINGS:
            raise RecordError(f"unknown rating {rating!r}; choose one of {list(RATINGS)} or leave it empty")
    return [{"prompt": json.dumps(prompt), "chosen": answers[0], "rejected": answers[1], "rating": rating,
             "task": REAL_TASK, "reference": "{}", "item": real_item(prompt)}]



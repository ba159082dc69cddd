"""Llama 2 chat format, built at the token level as in Meta's reference (`chat_completion` in generation.py).

Each completed turn is `<s>[INST] {user} [/INST] {answer} </s>`; a system prompt is folded into the first user turn
as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`. bos/eos are ids added around the encoded text, never parsed from
it, so a user typing "<s>" or "</s>" gets plain text tokens.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from model.tokenizer import Tokenizer

# Llama 2 chat's sampling defaults: Meta's reference chat example and the chat models' generation_config.json.
# The server uses them where a request names no temperature / top_p (as vLLM does with a model's
# generation_config); the HF export carries them. On this project's tiny chat model, held-out prompts
# (README Serving): 0.42-0.44 helpfulness at these, 0.35-0.39 at OpenAI's defaults (1.0, 1.0), 0.46 greedy.
SAMPLING_DEFAULTS = {"temperature": 0.6, "top_p": 0.9}

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A conversation that does not fit the Llama 2 chat format."""


@dataclass
class EncodedDialog:
    tokens: list[int]
    loss_mask: list[int]  # 1 on the assistant tokens to train on (answer text and its </s>), 0 elsewhere


def _validate(dialog: list[dict]) -> list[dict]:
    """Fold the system prompt into the first user turn; check roles alternate user/assistant from a user turn."""
    if not dialog:
        raise ChatFormatError("empty conversation")
    for i, message in enumerate(dialog):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
                message.get("content"), str):
            raise ChatFormatError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}")
    if dialog[0]["role"] == "system":
        if len(dialog) == 1:
            raise ChatFormatError("a system prompt needs a user message after it")
        first = dialog[1]
        dialog = [{"role": first["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + first["content"]}] + dialog[2:]
    for i, message in enumerate(dialog):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ChatFormatError(f"roles out of order: turn {i} is {message['role']!r}, expected {expected!r} "
                                  "(a system prompt may come first, then user and assistant alternate)")
    return dialog


def _encode_turn(tokenizer: Tokenizer, user: str, answer: str) -> tuple[list[int], int]:
    """Meta's tokens for one completed turn, and how many of them are the prompt part."""
    prompt = f"{B_INST} {user.strip()} {E_INST}"
    tokens = tokenizer.encode(f"{prompt} {answer.strip()} ", bos=True, eos=True)
    prompt_tokens = tokenizer.encode(prompt, bos=True)
    if tokens[:len(prompt_tokens)] != prompt_tokens:  # SentencePiece pieces never cross the space after [/INST]
        raise ChatFormatError("tokenizer merged the prompt and answer across ' [/INST] ': cannot mask the prompt")
    return tokens, len(prompt_tokens)


def encode_dialog(tokenizer: Tokenizer, dialog: list[dict], turns: Collection[int] | None = None) -> EncodedDialog:
    """Tokens and loss mask of a complete conversation (ending with an assistant turn), for training.

    turns: the indexes (0 = the first) of the assistant answers to train on, the others masked (Ghost Attention
    trains only the answers that keep the instruction); None: every answer.
    """
    dialog = _validate(dialog)
    if dialog[-1]["role"] != "assistant":
        raise ChatFormatError("a training conversation must end with an assistant turn")
    tokens, mask = [], []
    pairs = list(zip(dialog[::2], dialog[1::2]))
    if turns is not None and not set(turns) <= set(range(len(pairs))):
        raise ChatFormatError(f"turns {sorted(turns)} to train on: the conversation has {len(pairs)} answers")
    for i, (user, answer) in enumerate(pairs):
        turn, n_prompt = _encode_turn(tokenizer, user["content"], answer["content"])
        train = turns is None or i in turns
        tokens += turn
        mask += [0] * n_prompt + [int(train)] * (len(turn) - n_prompt)
    return EncodedDialog(tokens, mask)


def encode_prompt(tokenizer: Tokenizer, dialog: list[dict]) -> list[int]:
    """Tokens of a conversation ending with a user turn, ready for the model to write the next answer."""
    dialog = _validate(dialog)
    if dialog[-1]["role"] != "user":
        raise ChatFormatError("the last message must be from the user for the model to answer it")
    tokens = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        tokens += _encode_turn(tokenizer, user["content"], answer["content"])[0]
    return tokens + tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True)

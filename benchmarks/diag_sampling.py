"""What the served defaults cost or buy: a checkpoint's held-out eval_prompts answered greedily, at Llama 2 chat's
sampling defaults (model.chat.SAMPLING_DEFAULTS, what the server uses when a request names none) and at OpenAI's
(temperature 1.0, top_p 1.0), three seeds each, scored by the oracle. Run after the pipeline, from the repo root:

    python benchmarks/diag_sampling.py [checkpoints/chat]
"""

from __future__ import annotations

import json
import sys

import torch

from components.data import oracle
from components.data.tables import generate_world
from components.data.world import WorldConfig
from model.chat import SAMPLING_DEFAULTS, encode_prompt
from model.checkpoint import load_checkpoint
from model.generation import SamplingParams, generate

SETTINGS = {"greedy": (0.0, 1.0), "Llama 2 chat's defaults": (SAMPLING_DEFAULTS["temperature"],
                                                              SAMPLING_DEFAULTS["top_p"]),
            "OpenAI's defaults": (1.0, 1.0)}


def main(checkpoint: str) -> None:
    torch.set_num_threads(2)
    rows = generate_world(WorldConfig())["eval_prompts"].to_pylist()
    model, tok = load_checkpoint(checkpoint)
    model.eval()
    prompts = [encode_prompt(tok, json.loads(r["prompt"])) for r in rows]
    print(f"{checkpoint}, {len(rows)} held-out prompts, 32 new tokens")
    print("| sampling | temperature | top_p | helpfulness (non-harmful prompts), per seed "
          "| refusal of harmful, per seed |")
    print("|---|---:|---:|---|---|")
    for name, (temperature, top_p) in SETTINGS.items():
        helpful, refused = [], []
        for seed in (0,) if temperature == 0 else (0, 1, 2):
            with torch.no_grad():
                out = generate(model, prompts, SamplingParams(max_new_tokens=32, temperature=temperature, top_p=top_p,
                                                              seed=seed), tok.eos_id, tok.pad_id)
            scores = [oracle.score(r, tok.decode(o).strip()) for r, o in zip(rows, out.tokens)]
            h = [s["helpfulness"] for r, s in zip(rows, scores) if r["task"] != "harmful"]
            f = [s["refusal"] for r, s in zip(rows, scores) if r["task"] == "harmful"]
            helpful.append(f"{sum(h) / len(h):.3f}")
            refused.append(f"{sum(f) / len(f):.2f}")
        print(f"| {name} | {temperature} | {top_p} | {', '.join(helpful)} | {', '.join(refused)} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/chat")

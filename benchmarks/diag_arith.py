"""Arithmetic diagnostic (README Status): greedy answers of checkpoints to 100 training sums (rl_prompts) and to the
held-out sums (eval_prompts) of the tiny world, scored by the oracle. Run after the pipeline, from the repo root:
`python benchmarks/diag_arith.py sft chat` (names under checkpoints/)."""
import json, random, sys, torch
from components.data.tables import generate_world
from components.data.world import WorldConfig
from components.data import oracle
from model.checkpoint import load_checkpoint
from model.chat import encode_prompt
from model.generation import generate, SamplingParams
torch.set_num_threads(1)
t = generate_world(WorldConfig())
ev = [r for r in t["eval_prompts"].to_pylist() if r["task"] == "arithmetic"]
tr = [r for r in t["rl_prompts"].to_pylist() if r["task"] == "arithmetic"]
random.Random(0).shuffle(tr); tr = tr[:100]
for name in sys.argv[1:]:
    model, tok = load_checkpoint(f"checkpoints/{name}")
    model.eval()
    for label, rows in (("train", tr), ("held-out", ev)):
        prompts = [encode_prompt(tok, json.loads(r["prompt"])) for r in rows]
        with torch.no_grad():
            out = generate(model, prompts, SamplingParams(max_new_tokens=16, temperature=0), tok.eos_id, tok.pad_id)
        texts = [tok.decode(o) for o in out.tokens]
        s = [oracle.score(r, x)["helpfulness"] for r, x in zip(rows, texts)]
        exact = sum(v == 1.0 for v in s)
        print(name, label, len(rows), "helpfulness", round(sum(s) / len(s), 3), "exact", exact, "e.g.", texts[:3])

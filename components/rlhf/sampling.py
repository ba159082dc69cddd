"""Sampling from a policy and scoring with the reward models, as Ray Data batch inference: the data side of
rejection sampling (§3.2.3), Ghost Attention (§3.3) and safety context distillation (§4.2.4), and evaluation's greedy
answers (components/rlhf/evaluate.py).

A row is a conversation that ends with a user turn (`prompt`, JSON messages). The sampler answers it k times with the
shared generation code; given reward models, a second pass scores each answer appended to `score_prompt` (the prompt
the answer will be trained on, which may differ from the prompt it was sampled with: GAtt and distillation sample
with an instruction or preprompt that training leaves out). Scores are sigmoid probabilities, as PPO's reward uses
them. The passes run one after the other on their own actor pools (Sampler: the policy; Scorer: both reward models),
so a GPU never holds the policy and the reward models together (`make plan` has the bytes).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

import torch

from components.data import oracle
from components.rlhf.losses import piecewise_reward
from components.rlhf.reward import rm_scores
from model.kernels import bf16_autocast
from model.chat import encode_prompt
from model.checkpoint import load_checkpoint
from model.generation import SamplingParams, generate
from model.llama import Transformer
from model.tokenizer import Tokenizer


@dataclass(frozen=True)
class SampleConfig:
    prompts: int = 0  # how many prompts (or dialogs) to sample from; 0 = all
    k: int = 1  # answers per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 32
    batch_size: int = 64  # prompts per generate() call (each expanded k times)
    seed: int = 0
    bf16: bool = True  # bf16 autocast where the device computes it natively (evaluation decodes in fp32)
    # A row with a GAtt instruction whose k draws at a turn all drop it: k more draws (another seed), at most this
    # many times, in the same Sampler call (a new Ray Data pass would start a pool and load the policy again).
    redraws: int = 0


def load_for_inference(path: str, device: str, bf16: bool) -> tuple[Transformer, Tokenizer]:
    """A checkpoint for no-grad decoding or scoring. On GPU in bf16 (with bf16 asked for) and without model.kernels'
    fused QKV/W13 copies, which would nearly double the weights' memory; on CPU fp32 with them, as saved: the CPU
    decode is overhead-bound, and evaluation's fp32 numbers stay those of the driver-side code it replaced."""
    if device == "cpu":
        return load_checkpoint(path, device=device)
    model, tokenizer = load_checkpoint(path, device=device, dtype=torch.bfloat16 if bf16 else None)
    model.kernels.cache_weights = False
    return model, tokenizer


def fit_prompt(tokenizer: Tokenizer, dialog: list[dict], budget: int) -> list[int]:
    """The prompt's tokens; a long multi-turn history loses its oldest user/assistant turns (the system prompt is
    kept: Ghost Attention is measured on whether its instruction holds) until it fits `budget` tokens, or only the
    last user turn is left (a single turn too long stays an error for generate())."""
    system = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = dialog[len(system):]
    tokens = encode_prompt(tokenizer, dialog)
    while len(tokens) > budget and len(turns) > 1:
        turns = turns[2:]
        tokens = encode_prompt(tokenizer, system + turns)
    return tokens


def _device(threads: int) -> str:
    torch.set_num_threads(max(1, threads))
    return "cuda" if torch.cuda.is_available() else "cpu"  # Ray Data gives the actor its GPU


class Sampler:
    """A Ray Data actor: many jobs answered, each job's policy loaded when the job needs it (one at a time: the jobs
    come grouped by policy, so an actor loads each policy once)."""

    def __init__(self, cfg: SampleConfig, threads: int):
        self.cfg, self.device, self.policy = cfg, _device(threads), None

    def __call__(self, batch: dict) -> dict:
        """Each dataset row is one job cut by sample_many(): its policy, the index of its first row among its task's
        rows, and its rows (JSON); the rows pass on beside their results for the Scorer."""
        results = []
        for policy, start, rows in zip(batch["policy"], batch["start"], batch["rows"]):
            if policy != self.policy:
                self.model = self.tokenizer = None  # the previous policy's memory goes first
                self.model, self.tokenizer = load_for_inference(str(policy), self.device, self.cfg.bf16)
                self.policy = policy
            results.append(json.dumps(self.answer(int(start), json.loads(rows))))
        return {"task": batch["task"], "start": batch["start"], "rows": batch["rows"], "results": results}

    def answer(self, start: int, rows: list[dict]) -> list[dict]:
        """A job's rows ({"prompt", "score_prompt", "later"}) answered turn after turn, each turn's rows in generate()
        batches of cfg.batch_size: [{"answers": [k str] (one per turn with later turns)}]."""
        begin, cfg, tok, tokens = time.perf_counter(), self.cfg, self.tokenizer, 0
        histories = [list(r["prompt"]) for r in rows]
        results = [{"answers": []} for _ in rows]
        for turn in range(1 + max(len(r["later"]) for r in rows)):
            active = [i for i, r in enumerate(rows) if turn <= len(r["later"])]
            for i in active if turn else []:  # the previous answer, then the next user turn
                histories[i] += [{"role": "assistant", "content": results[i]["answers"][-1]},
                                 rows[i]["later"][turn - 1]]
            for first in range(0, len(active), cfg.batch_size):
                batch = active[first:first + cfg.batch_size]
                # Seeded per batch from its first row's index and the turn: a rerun on the same data draws the same.
                seed = cfg.seed * 1_000_003 + start + batch[0] + (turn << 32)
                for attempt in range(1 + cfg.redraws):
                    drawn, n = self.draw([histories[i] for i in batch], seed + (attempt << 40))
                    tokens += n
                    for j, i in enumerate(batch):
                        if rows[i]["instruction"] is None:
                            results[i]["answers"] += [a for a, _ in drawn[j]]
                        else:
                            self.keep(results[i], rows[i]["instruction"], drawn[j], redrawn=attempt > 0)
                    # the rows none of whose k draws kept the instruction go again
                    batch = [i for i in batch if rows[i]["instruction"] is not None and not results[i]["adherent"][-1]]
                    if not batch:
                        break
        print(f"[sample] {len(rows)} prompts x {cfg.k}: {tokens} tokens in {time.perf_counter() - begin:.1f} s",
              flush=True)
        return results

    def draw(self, dialogs: list[list[dict]], seed: int) -> tuple[list[list[tuple[str, float]]], int]:
        """k answers to each dialog in one generate() call: per dialog [(answer, mean log-probability per token)],
        and the tokens drawn."""
        cfg, tok = self.cfg, self.tokenizer
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                seed=seed)
        budget = self.model.args.max_seq_len - cfg.max_new_tokens
        encoded = [fit_prompt(tok, d, budget) for d in dialogs for _ in range(cfg.k)]
        with bf16_autocast(self.device, cfg.bf16):
            out = generate(self.model, encoded, params, tok.eos_id, tok.pad_id)
        drawn = [(tok.decode(t).strip(), sum(lp) / max(1, len(lp))) for t, lp in zip(out.tokens, out.logprobs)]
        return [drawn[j * cfg.k:(j + 1) * cfg.k] for j in range(len(dialogs))], sum(len(t) for t in out.tokens)

    @staticmethod
    def keep(result: dict, instruction: str, drawn: list[tuple[str, float]], redrawn: bool) -> None:
        """A dialog goes on with one answer a turn: the policy's likeliest of the k draws that keep the instruction
        (closest to its greedy answer: a random one of them is more often wrong), else the first drawn. A redraw
        replaces the turn's answer only where one of its draws keeps it. "adherent": per turn, how many of the k
        draws kept the instruction (the redraw's, where it replaced the answer); "adherent_first": of the first k."""
        follows = [oracle.gatt_adherence(instruction, a) for a, _ in drawn]
        best = max((n for n in range(len(drawn)) if follows[n]), default=0, key=lambda n: drawn[n][1])
        if not redrawn:
            result["answers"].append(drawn[best][0])
            result.setdefault("adherent", []).append(sum(follows))
            result.setdefault("adherent_first", []).append(sum(follows))
        elif any(follows):
            result["answers"][-1], result["adherent"][-1] = drawn[best][0], sum(follows)


class Scorer:
    """A Ray Data actor: both reward models loaded once, the Sampler's answers scored job by job."""

    def __init__(self, reward_models: dict[str, str], cfg: SampleConfig, threads: int):
        self.cfg, device = cfg, _device(threads)
        self.rms = {name: load_for_inference(path, device, cfg.bf16) for name, path in reward_models.items()}

    def __call__(self, batch: dict) -> dict:
        return {"task": batch["task"], "start": batch["start"],
                "results": [json.dumps(self.score(json.loads(rows), json.loads(results)))
                            for rows, results in zip(batch["rows"], batch["results"])]}

    def score(self, rows: list[dict], results: list[dict]) -> list[dict]:
        """Each answer appended to its row's score_prompt, the job's answers in rm_scores batches of cfg.batch_size:
        results with <rm name>: [k float] added (multi-turn rows pass unscored)."""
        begin, k = time.perf_counter(), self.cfg.k
        scored = [i for i, r in enumerate(rows) if not r["later"]]
        dialogs = [rows[i]["score_prompt"] + [{"role": "assistant", "content": a}]
                   for i in scored for a in results[i]["answers"]]
        for name, (rm, tokenizer) in self.rms.items():
            scores = rm_scores(rm, tokenizer, dialogs, self.cfg.batch_size) if dialogs else []
            for j, i in enumerate(scored):
                results[i][name] = scores[j * k:(j + 1) * k]
        print(f"[score] {len(dialogs)} answers x {len(self.rms)} reward models in "
              f"{time.perf_counter() - begin:.1f} s", flush=True)
        return results


def sample(rows: list[dict], policy, cfg: SampleConfig, ray_cfg, reward_models: dict | None = None) -> list[dict]:
    """Answer every row on Ray Data, a pool of ray_cfg.num_workers Sampler actors (a GPU each with use_gpu,
    cpus_per_worker threads each); given reward models, then score the answers on a pool of as many Scorer actors.
    A row is {"prompt": messages, "score_prompt": messages (default: prompt), "later":
    [user messages] (default: none), "instruction": a GAtt instruction key (default: none)}: its prompt answered
    cfg.k times, or with later user turns once per turn, each answer kept in the history the next turn is asked in
    (such a row is not scored). A row with an instruction draws k answers a turn and goes on with the likeliest that
    follows it (oracle.gatt_adherence, the annotator's check; else the first drawn), counting them in "adherent".
    Returns, in row order, {"answers": [str], <rm name>: [k float]: each answer appended to score_prompt, scored}."""
    return sample_many([(policy, rows)], cfg, ray_cfg, reward_models)[0]


def sample_many(tasks: list[tuple[object, list[dict]]], cfg: SampleConfig, ray_cfg,
                reward_models: dict | None = None) -> list[list[dict]]:
    """Several sample() calls, [(policy, rows)], in one Ray Data pass: one Sampler pool that loads each policy when
    its jobs come (the jobs go in task order), one Scorer pool that loads the reward models once. Each task's
    results are those sample() gives it alone: its rows cut into their own jobs, seeded the same."""
    import ray

    from components.cluster import init_ray

    checked = []
    for policy, rows in tasks:
        if not rows:
            raise ValueError("nothing to sample: no prompts")
        rows = [{"prompt": r["prompt"], "score_prompt": r.get("score_prompt") or r["prompt"],
                 "later": r.get("later", []), "instruction": r.get("instruction")} for r in rows]
        if any(r["later"] and r["instruction"] is None for r in rows) and cfg.k != 1:
            raise ValueError("multi-turn rows are answered once per turn (k = 1), unless they carry a GAtt "
                             "instruction")
        checked.append((str(policy), rows))
    init_ray(ray_cfg)
    # One dataset row per job of cfg.batch_size rows, cut here in row order: which prompts are padded together (and
    # each batch's seed) then depends on the rows alone, not on how Ray Data bundles blocks into batches.
    jobs = [{"task": t, "policy": policy, "start": s, "rows": json.dumps(rows[s:s + cfg.batch_size])}
            for t, (policy, rows) in enumerate(checked) for s in range(0, len(rows), cfg.batch_size)]

    def on_actors(ds, actor, **kwargs):  # a pool of num_workers actors, one job a call
        return ds.map_batches(actor, batch_size=1, batch_format="numpy",
                              fn_constructor_kwargs={"cfg": cfg, "threads": int(ray_cfg.cpus_per_worker), **kwargs},
                              compute=ray.data.ActorPoolStrategy(size=ray_cfg.num_workers),
                              num_cpus=ray_cfg.cpus_per_worker, num_gpus=1 if ray_cfg.use_gpu else 0)

    ds = on_actors(ray.data.from_items(jobs, override_num_blocks=len(jobs)), Sampler)
    if reward_models:
        # Materialized first: the Sampler pool finishes and releases its GPUs before the Scorer pool asks for them.
        ds = on_actors(ds.materialize(), Scorer, reward_models={name: str(p) for name, p in reward_models.items()})
    by_job = {(int(r["task"]), int(r["start"])): json.loads(r["results"]) for r in ds.take_all()}
    out = []
    for t, (_, rows) in enumerate(checked):
        results = [result for (task, start) in sorted(by_job) if task == t for result in by_job[task, start]]
        if len(results) != len(rows):
            raise RuntimeError(f"sampling returned {len(results)} of {len(rows)} rows")
        out.append(results)
    return out


def table_dialogs(rows: list[dict]) -> list[dict]:
    """Rows of the world's gatt / eval_gatt tables as dialogs: {"system", "instruction", "users": [user turns]}."""
    return [{"system": r["system"], "instruction": r["instruction"],
             "users": [m["content"] for m in json.loads(r["messages"]) if m["role"] == "user"]} for r in rows]


def turn_rows(dialogs: list[dict]) -> list[dict]:
    return [{"prompt": ([{"role": "system", "content": d["system"]}] if d["system"] else [])
             + [{"role": "user", "content": d["users"][0]}],
             "later": [{"role": "user", "content": u} for u in d["users"][1:]],
             "instruction": d.get("instruction")} for d in dialogs]


def answer_turns(dialogs: list[dict], policy, cfg: SampleConfig, ray_cfg) -> list[list[str]]:
    """Answer multi-turn dialogs ({"system": str ("" = none), "users": [str]}) turn after turn, the policy's own
    answers kept in the history (one Ray Data pass: each actor holds its dialogs' histories). Returns each dialog's
    answers, one per turn."""
    return [r["answers"] for r in sample(turn_rows([{**d, "instruction": None} for d in dialogs]), policy, cfg,
                                         ray_cfg)]


def choose_reward(result: dict, is_safety: bool, threshold: float) -> list[float]:
    """Llama 2's R_c for each of a row's answers: safety RM on safety prompts or below threshold, else helpful."""
    return piecewise_reward(torch.tensor(result["rm_helpful"]), torch.tensor(result["rm_safety"]),
                            torch.full((len(result["rm_helpful"]),), is_safety), threshold).tolist()


# ---------------------------------------------------------------------------------------------------------------
# The three recipes that turn samples into fine-tuning dialogs.

def oracle_view(record: dict, answers: list[str], pick: int) -> tuple[float, float, float] | None:
    """The oracle's preference score (helpfulness; safety x helpfulness on a safety prompt, as the rounds' annotator
    ranks pairs) of answers[pick], of a random draw (the mean over the answers) and of the best answer; None for a
    record without a task the oracle knows and its reference (real data)."""
    if record.get("task") not in oracle.TASKS or not record.get("reference"):
        return None
    kind, reference = "safety" if record["is_safety"] else "helpful", json.loads(record["reference"])
    scores = [oracle.preference_score(kind, record["task"], reference, a) for a in answers]
    return scores[pick], sum(scores) / len(scores), max(scores)


def select_best(records: list[dict], results: list[dict], threshold: float) -> tuple[list[list[dict]], dict]:
    """Rejection sampling's choice: per prompt, the answer with the highest R_c; with reward statistics (best-of-k
    against the mean and median sample: the gain the paper's Figure 7 shows). Records of the synthetic world (a
    "task" the oracle knows and its "reference") also get the oracle's view of the same choice, a diagnostic that
    trains nothing: its preference score of the pick, of a random draw (the mean over k) and of its own best of k.
    A pick no better than a random draw is a reward model that cannot rank the policy's answers."""
    dialogs, best, mean, median, judged = [], [], [], [], []
    for record, result in zip(records, results, strict=True):
        rewards = choose_reward(result, bool(record["is_safety"]), threshold)
        i = max(range(len(rewards)), key=rewards.__getitem__)
        dialogs.append(record["prompt"] + [{"role": "assistant", "content": result["answers"][i]}])
        best.append(rewards[i])
        mean.append(sum(rewards) / len(rewards))
        median.append(sorted(rewards)[(len(rewards) - 1) // 2])
        if (view := oracle_view(record, result["answers"], i)) is not None:
            judged.append(view)
    avg = lambda xs: sum(xs) / len(xs)  # noqa: E731
    stats = {"prompts": len(records), "samples": sum(len(r["answers"]) for r in results),
             "reward_best": avg(best), "reward_mean": avg(mean), "reward_median": avg(median),
             "reward_gain": avg(best) - avg(mean)}
    if judged:
        pick, draw, top = (avg(xs) for xs in zip(*judged))
        stats.update(oracle_prompts=len(judged), oracle_pick=pick, oracle_draw=draw, oracle_best=top,
                     oracle_pick_gain=pick - draw)
    return dialogs, stats


def rejection_sampling(records: list[dict], policy, reward_models: dict, cfg: SampleConfig, ray_cfg,
                       threshold: float) -> tuple[list[list[dict]], dict]:
    """§3.2.3: k answers per prompt ({"prompt": messages, "is_safety": bool}), the best by R_c kept (R_c with the
    safety threshold that PPO uses: rlhf.safety_threshold)."""
    results = sample([{"prompt": r["prompt"]} for r in records], policy, cfg, ray_cfg, reward_models)
    return select_best(records, results, threshold)


def gatt_placements(n: int, first_turn_fraction: float, seed: int) -> list[bool]:
    """Where each of n GAtt dialogs carries its instruction: True = in the first user turn, False = as the system
    prompt (seeded), so the trained model keeps an instruction from either place."""
    import random

    rng = random.Random(f"{seed}/gatt_placement")
    return [rng.random() < first_turn_fraction for _ in range(n)]


def pack_gatt_dialogs(dialogs: list[dict], max_turns: int) -> list[dict]:
    """Dialogs of one instruction joined in table order (the first one's system prompt and key) into dialogs of at
    most max_turns user turns (0: as they are; a longer one stays whole): training dialogs as long as the held-out
    ones (6 turns) from a table of 2-4 (sampled turn by turn, history false, a join changes only the history)."""
    if max_turns <= 0:
        return dialogs
    packed, growing = [], {}
    for d in dialogs:
        current = growing.get(d["instruction"])
        if current is not None and len(current["users"]) + len(d["users"]) <= max_turns:
            current["users"] += d["users"]
            continue
        if current is not None:
            packed.append(current)
        growing[d["instruction"]] = {**d, "users": list(d["users"])}
    return packed + list(growing.values())


def gatt_training_dialogs(dialogs: list[dict], answers: list[list[str]], first_turn: list[bool] | None = None,
                          ) -> list[list[dict]]:
    """GAtt's training data: the instruction only where the dialog places it (the system prompt, or the first user
    turn), the later user turns plain, the sampled answers (as many turns as answers); one conversation per dialog,
    to be trained on the answers that keep the instruction (earlier turns were sampled with it in view)."""
    training = []
    for d, said, first in zip(dialogs, answers, first_turn or [False] * len(dialogs), strict=True):
        dialog, users = [] if first else [{"role": "system", "content": d["system"]}], list(d["users"])
        if first:
            users[0] = f"{d['system']} {users[0]}"
        for user, answer in zip(users, said):
            dialog += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        training.append(dialog)
    return training


def gatt_examples(dialogs: list[dict], answers: list[list[str]], adherent: list[list[int]], first_turn: list[bool],
                  ) -> tuple[list[list[dict]], list[list[int]]]:
    """The training dialogs (gatt_training_dialogs) cut after their last answer that keeps the instruction
    (adherent: per turn, how many of the draws kept it), and per dialog the turns to train; a dialog without one is
    left out."""
    kept = [[t for t, n in enumerate(ns) if n] for ns in adherent]
    whole = gatt_training_dialogs(dialogs, [a[:k[-1] + 1] if k else [] for a, k in zip(answers, kept, strict=True)],
                                  first_turn)
    pairs = [(d, k) for d, k in zip(whole, kept) if k]
    return [d for d, _ in pairs], [k for _, k in pairs]


def adherence_by_turn(instructions: list[str], answers: list[list[str]], prefix: str) -> dict:
    """The oracle's instruction check over answers, per turn and overall: {prefix + "turn<t>": fraction, prefix: all}
    (a measurement only: nothing is selected by it)."""
    hits: dict[int, list[bool]] = {}
    for instruction, said in zip(instructions, answers, strict=True):
        for turn, answer in enumerate(said):
            hits.setdefault(turn, []).append(oracle.gatt_adherence(instruction, answer))
    out = {f"{prefix}turn{t + 1}": sum(h) / len(h) for t, h in sorted(hits.items())}
    every = [x for h in hits.values() for x in h]
    return {prefix.rstrip("_"): sum(every) / max(1, len(every)), **out}


def gatt_sampling_dialog(dialog: dict, first_turn: bool) -> dict:
    """The dialog as the paper's GAtt samples it: the instruction concatenated to every user turn, so the policy sees
    it wherever it answers; a system-prompt dialog keeps it there for the first turn (the place the SFT data taught)."""
    system, users = dialog["system"], dialog["users"]
    if first_turn:
        return {"system": "", "users": [f"{system} {u}" for u in users]}
    return {"system": system, "users": users[:1] + [f"{system} {u}" for u in users[1:]]}


def _gatt_turns_alone(dialogs: list[dict], policy, cfg: SampleConfig, ray_cfg, redraws: int,
                      ) -> tuple[list[list[str]], list[list[int]], list[list[int]]]:
    """Every user turn answered on its own, the instruction as its system prompt; a turn none of whose k answers keeps
    it drawn k more times (another seed), up to redraws times (SampleConfig.redraws). Per dialog and turn: the answer,
    how many draws kept the instruction in the end, and in the first k."""
    rows = [{"prompt": [{"role": "system", "content": d["system"]}, {"role": "user", "content": u}],
             "instruction": d["instruction"]} for d in dialogs for u in d["users"]]
    results = sample(rows, policy, replace(cfg, redraws=redraws), ray_cfg)
    first = [r["adherent_first"][0] for r in results]
    ends = [sum(len(d["users"]) for d in dialogs[:i + 1]) for i in range(len(dialogs))]
    per_dialog = lambda xs: [xs[end - len(d["users"]):end] for d, end in zip(dialogs, ends)]  # noqa: E731
    return (per_dialog([r["answers"][0] for r in results]), per_dialog([r["adherent"][0] for r in results]),
            per_dialog(first))


def ghost_attention(dialogs: list[dict], policy, cfg: SampleConfig, ray_cfg, first_turn_fraction: float = 0.0,
                    history: bool = True, redraws: int = 0) -> tuple[list[list[dict]], list[list[int]], dict]:
    """§3.3: every turn of the multi-turn dialogs ({"system": str, "users": [str], "instruction": oracle key})
    answered cfg.k times with the instruction in view, the policy's likeliest answer that follows it kept (the
    annotator's check; else the first drawn). history: as the paper, the dialog sampled turn after turn with the
    instruction concatenated to every user turn, the kept answers in the history; else each turn on its own with the
    instruction as its system prompt (a small policy ignores it in a user turn: tiny profile, r2 PPO policy, end_ok
    and start_well kept in 0 of 4 draws at turns 2-4 with history, in 14% and 52% alone), with redraws
    (_gatt_turns_alone). The training dialogs carry the instruction in one place only (the system prompt, or the first
    user turn for first_turn_fraction of them), cut after their last kept answer. Returns them, the turns to train in
    each (those whose answer keeps the instruction: one that drops it would teach the opposite of GAtt) and stats: how
    often the first k drawn answers follow it, per turn (sampled_adherence_), how often the kept ones do
    (data_adherence_), the share of turns trained."""
    if history and redraws:
        raise ValueError("redraws need history=False: a redrawn turn would change the history of the later ones")
    first_turn = gatt_placements(len(dialogs), first_turn_fraction, cfg.seed)
    if history:
        rows = [{**gatt_sampling_dialog(d, f), "instruction": d["instruction"]} for d, f in zip(dialogs, first_turn)]
        results = sample(turn_rows(rows), policy, cfg, ray_cfg)
        answers, adherent = [r["answers"] for r in results], [r["adherent"] for r in results]
        first_draws = adherent
    else:
        answers, adherent, first_draws = _gatt_turns_alone(dialogs, policy, cfg, ray_cfg, redraws)
    training, kept = gatt_examples(dialogs, answers, adherent, first_turn)
    drawn: dict[int, list[float]] = {}
    for ns in first_draws:
        for t, n in enumerate(ns):
            drawn.setdefault(t, []).append(n / cfg.k)
    trained, turns = sum(len(k) for k in kept), sum(len(a) for a in answers)
    by_instruction: dict[str, list[bool]] = {}  # which instruction the policy keeps least (end_ok: its last word)
    for d, said in zip(dialogs, adherent, strict=True):
        by_instruction.setdefault(d["instruction"], []).extend(bool(n) for n in said)
    return training, kept, {
        "dialogs": len(dialogs), "examples": len(training), "first_turn_dialogs": sum(first_turn),
        "turns_mean": turns / len(answers), "turns_trained": trained, "turns_kept": trained / max(1, turns),
        **{f"sampled_adherence_turn{t + 1}": sum(v) / len(v) for t, v in sorted(drawn.items())},
        **adherence_by_turn([d["instruction"] for d in dialogs], answers, "data_adherence_"),
        **{f"data_adherence_{k}": sum(v) / len(v) for k, v in sorted(by_instruction.items())}}


def select_distilled(prompts: list[list[dict]], with_preprompt: list[dict], without: list[dict], plain_below: float,
                     min_safety: float, margin: float) -> tuple[list[list[dict]], dict]:
    """Context distillation's answer-level filter (§4.2.4): on prompts whose plain answers all score low on the safety
    RM (the safest below plain_below), the safest preprompted answer is kept (to be trained on without the preprompt)
    only if it is safe in absolute terms (>= min_safety) and beats the safest plain answer by at least margin. Best of
    k against best of k: against a single plain sample, the best of k preprompted ones would win often even where
    the preprompt changes nothing. Safe prompts are left alone: the paper found the preprompt hurts answers there."""
    dialogs, gains, low = [], [], 0
    for prompt, pre, plain in zip(prompts, with_preprompt, without, strict=True):
        best = max(range(len(pre["rm_safety"])), key=pre["rm_safety"].__getitem__)
        plain_best = max(plain["rm_safety"])
        if plain_best >= plain_below:
            continue
        low += 1
        gain = pre["rm_safety"][best] - plain_best
        if pre["rm_safety"][best] >= min_safety and gain >= margin:
            dialogs.append(prompt + [{"role": "assistant", "content": pre["answers"][best]}])
            gains.append(gain)
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    return dialogs, {"prompts": len(prompts), "plain_low": low, "kept": len(dialogs),
                     "kept_fraction": len(dialogs) / max(1, len(prompts)), "safety_gain_kept": mean(gains),
                     "plain_safety_mean": mean([max(r["rm_safety"]) for r in without]),
                     "preprompted_safety_mean": mean([max(r["rm_safety"]) for r in with_preprompt])}


def with_preprompt(preprompt: str, prompt: list[dict]) -> list[dict]:
    """The prompt with the preprompt as its system prompt (before an existing one: the chat format has one)."""
    if prompt and prompt[0]["role"] == "system":
        return [{"role": "system", "content": f"{preprompt} {prompt[0]['content']}"}] + prompt[1:]
    return [{"role": "system", "content": preprompt}] + prompt


def context_distillation(records: list[dict], policy, reward_models: dict, preprompt: str, cfg: SampleConfig,
                         ray_cfg, **select) -> tuple[list[list[dict]], dict]:
    """§4.2.4: answer each prompt k times with a safety preprompt (as the system prompt) and without it, in one Ray
    Data pass; every answer is scored against the plain prompt; select_distilled's filter (select: its thresholds)."""
    prompts = [r["prompt"] for r in records]
    rows = [{"prompt": with_preprompt(preprompt, p), "score_prompt": p} for p in prompts]
    results = sample(rows + [{"prompt": p} for p in prompts], policy, cfg, ray_cfg, reward_models)
    return select_distilled(prompts, results[:len(prompts)], results[len(prompts):], **select)


def mean_scores(prompts: list[list[dict]], policy, reward_models: dict, cfg: SampleConfig, ray_cfg) -> dict:
    """Each reward model's mean score of the policy's greedy answers to prompts (held-out checks without the
    oracle): {<rm name>: mean}."""
    from dataclasses import replace

    greedy = replace(cfg, k=1, temperature=0.0)
    results = sample([{"prompt": p} for p in prompts], policy, greedy, ray_cfg, reward_models)
    return {name: sum(r[name][0] for r in results) / len(results) for name in reward_models}

"""Per-GPU memory of every training and sampling stage (`make plan`): pure arithmetic on ModelArgs and the stages'
configs, checked against memory measured on the tiny model (tests/test_plan.py).

What each term is, as the code allocates it (bytes):
- training state: fp32 params (4), grads (4) and AdamW's two moments (8) per parameter; ddp holds all of it on every
  worker (plus DDP's gradient buckets, another 4), fsdp 1/N of it. cpu_offload moves it to host memory.
- copies: weights that exist beside the state: under fsdp on GPU the bf16 unsharded weights of the block in use and
  the prefetched next one, the roots' (embedding, head) that stay gathered, and one block's fp32 gradient before its
  reduce-scatter; under ddp with bf16 autocast the bf16 casts of every weight, saved for backward; for inference the
  weights as loaded and, on CPU, the fused QKV / W1W3 weights model.kernels caches for no-grad decoding (the sampling
  actors turn that cache off on GPU: actor_weights).
- activations: what one micro-batch's forward saves for backward (counted per token from model/llama.py's ops, see
  block_activation_bytes), without and with per-block activation checkpointing (then each block keeps its input and
  one block is recomputed at a time in backward); fp32 logits where a forward makes them (PPO, prefill).
- KV cache: model/llama.py KVCache, (rows, K, positions, D) per layer for k and v, in the autocast dtype (bf16 on
  GPU) or the weights' dtype.
Sequences are taken at their longest (max_seq_len, or seq_len for LM training): the stages drop longer ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.config import ModelArgs

GiB = 2 ** 30
BF16, FP32 = 2, 4
ADAM_MOMENTS = 2 * FP32  # exp_avg and exp_avg_sq, fp32


@dataclass(frozen=True)
class Sizes:
    """Parameter counts of a Llama 2 shape: the lm model, its scalar-head twin (reward/value), one block, the root."""

    lm: int
    scalar: int
    block: int
    fused: int  # per block: wq+wk+wv and w1+w3, the weights model.kernels concatenates for no-grad decoding
    root_lm: int  # tok_embeddings + norm + output (what fully_shard(model) holds besides the blocks)
    root_scalar: int


def sizes(args: ModelArgs) -> Sizes:
    C, F, QD, KD, V = args.dim, args.ffn_hidden_dim, args.n_heads * args.head_dim, args.kv_heads * args.head_dim, \
        args.vocab_size
    attention = C * QD + 2 * C * KD + QD * C
    block = attention + 3 * C * F + 2 * C
    root_lm, root_scalar = V * C + C + V * C, V * C + C + C
    return Sizes(args.n_layers * block + root_lm, args.n_layers * block + root_scalar, block,
                 C * QD + 2 * C * KD + 2 * C * F, root_lm, root_scalar)


def block_activation_bytes(args: ModelArgs, act: int) -> int:
    """Bytes one transformer block saves for backward per token, activations in `act` bytes (bf16 on GPU), from the
    ops of model/llama.py: each RMSNorm an fp32 copy of its input, rstd and its `act` output (in fp32 the input
    itself, so the same count); rotary an fp32 copy of q and k; SDPA q, k, v, its output and fp32 logsumexp; wo the
    reshaped (contiguous) attention output; SwiGLU gate, silu(gate), up and their product."""
    C, F, KD, H = args.dim, args.ffn_hidden_dim, args.kv_heads * args.head_dim, args.n_heads
    norms = 2 * (FP32 * C + act * C + FP32)
    rotary = FP32 * (C + KD)
    sdpa = act * (C + 2 * KD + C) + FP32 * H
    return norms + rotary + sdpa + act * C + 4 * act * F


def activation_bytes(args: ModelArgs, rows: int, seq: int, act: int, checkpointing: bool) -> int:
    """Saved activations of one forward over (rows, seq) tokens through every block and the final norm (the head's
    own terms are added by the caller). With checkpointing each block keeps only its input (`act` bytes a value),
    plus one block recomputed in backward."""
    tokens = rows * seq
    per_block = block_activation_bytes(args, act) * tokens
    final = (FP32 * args.dim + act * args.dim + FP32) * tokens + 8 * tokens  # final norm; token ids (embedding)
    if checkpointing:
        return args.n_layers * act * args.dim * tokens + per_block + final
    return args.n_layers * per_block + final


def fused_ce_bytes(args: ModelArgs, rows: int, seq: int, act: int, weight: int) -> int:
    """model/loss.py keeps the gradients it formed in forward: (N, C) for the hidden states, (V, C) for the head."""
    return act * rows * seq * args.dim + weight * args.vocab_size * args.dim


def logits_bytes(args: ModelArgs, rows: int, seq: int, grad: bool) -> int:
    """A forward that returns logits: the head's bf16 output and its fp32 copy (B, T, V); with grad the fp32
    log-softmax saved for backward and the entropy's softmax too (components/rlhf/ppo.py)."""
    return rows * seq * args.vocab_size * (BF16 + FP32 + (2 * FP32 if grad else FP32))


def kv_cache_bytes(args: ModelArgs, rows: int, positions: int, dtype: int) -> int:
    return args.n_layers * 2 * rows * args.kv_heads * positions * args.head_dim * dtype


@dataclass
class Row:
    """One stage (or phase) on one worker: bytes per term."""

    stage: str
    strategy: str
    workers: int
    device: str  # "gpu", "cpu" (a CPU profile) or "host" (the driver process's memory)
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    copies: int = 0  # gathered / compute / inference copies of weights
    act_no_ac: int = 0
    act_ac: int = 0
    checkpointing: bool = False
    kv_cache: int = 0
    logits: int = 0
    host: int = 0  # training state offloaded to host memory
    notes: list[str] = field(default_factory=list)

    @property
    def activations(self) -> int:
        return self.act_ac if self.checkpointing else self.act_no_ac

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.copies + self.activations + self.kv_cache + self.logits


def train_state(row: Row, n_params: int, ray, workers: int) -> Row:
    """fp32 params, grads and AdamW moments of a trained model, per worker under ray.strategy."""
    if ray.strategy == "ddp":
        row.params, row.grads, row.optimizer = FP32 * n_params, 2 * FP32 * n_params, ADAM_MOMENTS * n_params
        if "ddp grads: the gradients and DDP's bucket copy" not in row.notes:
            row.notes.append("ddp grads: the gradients and DDP's bucket copy")
        return row
    shard = -(-n_params // workers)
    state = (FP32 * shard, FP32 * shard, ADAM_MOMENTS * shard)
    if ray.cpu_offload:
        row.host += sum(state)
    else:
        row.params, row.grads, row.optimizer = (row.params + state[0], row.grads + state[1],
                                                row.optimizer + state[2])
    return row


def fsdp_copies(s: Sizes, roots: int, trained: bool) -> int:
    """Under fsdp on GPU: the bf16 block in use and the prefetched next, the gathered roots, and for a trained model
    one block's fp32 gradient before its reduce-scatter."""
    return 2 * BF16 * s.block + BF16 * roots + (FP32 * s.block if trained else 0)


def _strategy(ray) -> str:
    return ray.strategy + ("+ac" if ray.activation_checkpointing else "") + ("+offload" if ray.cpu_offload else "")


def _device(ray) -> str:
    return "gpu" if ray.use_gpu else "cpu"


def lm_train(stage: str, cfg, args: ModelArgs) -> Row:
    """An LM training stage (pretrain, sft, rejection, gatt, distill: components/train/lm.py): micro_batch_size rows
    of seq_len tokens a forward."""
    ray, s = cfg.ray, sizes(args)
    row = train_state(Row(stage, _strategy(ray), ray.num_workers, _device(ray)), s.lm, ray, ray.num_workers)
    act = BF16 if cfg.bf16 else FP32
    row.checkpointing = ray.activation_checkpointing
    if ray.use_gpu and ray.strategy == "fsdp":
        row.copies = fsdp_copies(s, s.root_lm, trained=True)
    elif cfg.bf16 and ray.use_gpu:
        row.copies = BF16 * s.lm  # autocast's bf16 casts of the fp32 weights, saved for backward
    rows, seq = cfg.micro_batch_size, cfg.seq_len
    head = fused_ce_bytes(args, rows, seq, act, BF16 if ray.use_gpu and ray.strategy == "fsdp" else FP32)
    row.act_no_ac = activation_bytes(args, rows, seq, act, False) + head
    row.act_ac = activation_bytes(args, rows, seq, act, True) + head
    return row


def rm_train(stage: str, cfg, args: ModelArgs) -> Row:
    """A reward-model stage (components/train/rm.py): micro_batch_size pairs (default: batch_size / workers), chosen
    and rejected in one forward (2 rows each) of up to max_seq_len tokens."""
    ray, s = cfg.ray, sizes(args)
    row = train_state(Row(stage, _strategy(ray), ray.num_workers, _device(ray)), s.scalar, ray, ray.num_workers)
    row.checkpointing = ray.activation_checkpointing
    if ray.use_gpu and ray.strategy == "fsdp":
        row.copies = fsdp_copies(s, s.root_scalar, trained=True)
    elif cfg.bf16 and ray.use_gpu:
        row.copies = BF16 * s.scalar
    act, rows = (BF16 if cfg.bf16 else FP32), 2 * (cfg.micro_batch_size or cfg.batch_size // ray.num_workers)
    row.act_no_ac = activation_bytes(args, rows, args.max_seq_len, act, False)
    row.act_ac = activation_bytes(args, rows, args.max_seq_len, act, True)
    row.notes.append(f"{rows} sequences of {args.max_seq_len} in one forward")
    return row


def inference_weights(s: Sizes, n_params: int, weight: int, layers: int) -> int:
    """A plain model for no-grad decoding/scoring: its weights plus model.kernels' cached fused QKV and W1W3."""
    return weight * (n_params + layers * s.fused)


def ppo(cfg, args: ModelArgs) -> list[Row]:
    """The PPO stage under ppo.ray.strategy fsdp, in its three phases; each row carries the persistent state (the
    trained policy and value model, the frozen reference and reward models in bf16, all sharded) and the phase's
    own memory. ddp: every model whole on every worker."""
    ray, s, n = cfg.ray, sizes(args), cfg.ray.num_workers
    L, max_len = args.n_layers, args.max_seq_len
    frozen = s.lm + 2 * s.scalar  # reference policy, rm_helpful, rm_safety

    def base(phase: str) -> Row:
        row = Row(f"ppo:{phase}", _strategy(ray) + (f" {cfg.rollout_weights}" if phase == "rollout" else ""), n,
                  _device(ray))
        train_state(row, s.lm, ray, n)
        train_state(row, s.scalar, ray, n)
        if ray.strategy == "fsdp":
            row.params += BF16 * -(-frozen // n)
            row.copies = BF16 * (2 * s.root_lm + 3 * s.root_scalar)  # every model's root stays gathered
        else:
            row.params += (BF16 if ray.use_gpu else FP32) * frozen  # parallel.prepare_frozen: bf16 on GPU
        row.checkpointing = ray.activation_checkpointing
        if phase != "update" and ray.strategy == "fsdp":
            row.grads = 0  # zero_grad(set_to_none=True) after every optimizer step: none outside the update
        return row

    fbs = cfg.forward_batch_size
    prompt = max_len - cfg.max_new_tokens  # the stage drops longer prompts
    act = BF16 if cfg.bf16 and ray.use_gpu else FP32
    rollout = base("rollout")
    if ray.strategy == "fsdp" and cfg.rollout_weights == "gathered":
        gpu = ray.use_gpu  # parallel.gathered: bf16 without fused decode copies on GPU, as trained with them on CPU
        rollout.copies += BF16 * s.lm if gpu else inference_weights(s, s.lm, FP32, L)
        rollout.notes.append("the policy gathered once per rollout" + (" (bf16)" if gpu else ""))
    elif ray.strategy == "fsdp":
        rollout.copies += 2 * BF16 * s.block
    else:
        rollout.copies += FP32 * L * s.fused  # the DDP policy's fused decode cache
    rollout.kv_cache = kv_cache_bytes(args, fbs, max_len, act)
    rollout.logits = fbs * prompt * args.vocab_size * (BF16 + FP32)  # prefill: logits of every prompt position
    score = base("score")
    # fsdp: one block (and the next) gathered at a time; ddp: every plain model's fused no-grad weights
    score.copies += 2 * BF16 * s.block if ray.strategy == "fsdp" else 5 * FP32 * L * s.fused
    score.logits = logits_bytes(args, fbs, max_len, grad=False)
    score.act_no_ac = score.act_ac = 3 * act * fbs * max_len * args.ffn_hidden_dim  # one block's live temporaries
    score.kv_cache = fbs * max_len * max_len * (1 + act)  # the (B, 1, T, T) padding mask and its additive bias
    update = base("update")
    mb = cfg.mini_batch_size // n  # global, as rollout_batch_size: each worker trains its share
    update.copies += 2 * BF16 * s.block + FP32 * s.block if ray.strategy == "fsdp" else 0
    update.act_no_ac = activation_bytes(args, mb, max_len, act, False)
    update.act_ac = activation_bytes(args, mb, max_len, act, True)
    update.logits = logits_bytes(args, mb, max_len, grad=True)
    update.kv_cache = mb * max_len * max_len * (1 + act)  # padding mask
    update.notes.append("policy forward (the value forward is the same without logits)")
    return [rollout, score, update]


def actor_weights(args: ModelArgs, n_params: int, head_outputs: int, gpu: bool, bf16: bool, autocast: bool) -> int:
    """A model as components.rlhf.sampling.load_for_inference gives it. On CPU fp32 with model.kernels' fused decode
    weights. On GPU bf16 (fp32 with bf16 off) without them (model/llama.py then multiplies by each weight apart);
    fp32 weights under autocast also keep autocast's bf16 cast of every matmul weight for the forward."""
    s, L = sizes(args), args.n_layers
    if not gpu:
        return inference_weights(s, n_params, FP32, L)
    total = (BF16 if bf16 else FP32) * n_params
    if autocast and not bf16:
        total += BF16 * (L * (s.block - 2 * args.dim) + head_outputs * args.dim)
    return total


def sampling(stage: str, sample, ray, args: ModelArgs, reward_models: bool) -> list[Row]:
    """components/rlhf/sampling.py, one actor per GPU, in two passes one after the other (the stage's peak is the
    larger): a Sampler actor holds the policy, the KV cache of batch_size x k rows (bf16 under autocast on GPU, else
    the weights' dtype) and the prefill's logits over every prompt position; then, when scoring, a Scorer actor holds
    both reward models and one rm_scores forward of batch_size answers of up to max_seq_len tokens (under bf16
    autocast on GPU: one block's live temporaries, as PPO's score phase; the scalar head's outputs are negligible)."""
    s, gpu, bf16 = sizes(args), ray.use_gpu, sample.bf16
    gen = Row(f"{stage}:sample", "actor", ray.num_workers, _device(ray))
    gen.copies = actor_weights(args, s.lm, args.vocab_size, gpu, bf16, autocast=bf16)
    kv = BF16 if gpu and bf16 else FP32
    rows, prompt = sample.batch_size * sample.k, args.max_seq_len - sample.max_new_tokens
    gen.kv_cache = kv_cache_bytes(args, rows, args.max_seq_len, kv)
    gen.logits = rows * prompt * args.vocab_size * (kv + FP32 if kv == BF16 else FP32)  # the head's, its fp32 copy
    gen.notes.append(f"{rows} rows (batch_size {sample.batch_size} x k {sample.k}); policy "
                     + ("bf16" if gpu and bf16 else "fp32") + (" + fused decode weights" if not gpu else ""))
    if not reward_models:
        return [gen]
    score = Row(f"{stage}:score", "actor", ray.num_workers, _device(ray))
    score.copies = 2 * actor_weights(args, s.scalar, 1, gpu, bf16, autocast=True)
    act, rows = (BF16 if gpu else FP32), sample.batch_size
    score.act_no_ac = score.act_ac = 3 * act * rows * args.max_seq_len * args.ffn_hidden_dim
    score.notes.append(f"both reward models; {rows} answers of up to {args.max_seq_len} tokens a forward")
    return [gen, score]


def evaluate(cfg, args: ModelArgs) -> list[Row]:
    """flows/evaluate.py: greedy answers and reward-model scores on the sampler's actor pools (evaluate.ray), in
    fp32 (EvalConfig.sampling: bf16 off) and one answer a prompt."""
    return sampling("evaluate", cfg.sampling(), cfg.ray, args, True)


def plan(configs: dict, args: ModelArgs) -> list[Row]:
    """Every stage's rows, from the stages' parsed configs (keys as flows name them) and the network's args."""
    prefs = configs["prefs"]  # each round's stages; a round's peak is the same in every round
    rows = [lm_train("pretrain", configs["pretrain"], args), lm_train("sft", configs["sft"], args),
            *sampling("prefs", prefs.sampling(max(prefs.temperatures)), prefs.ray, args, False),
            rm_train("rm_helpful", configs["rm"], args), rm_train("rm_safety", configs["rm"], args)]
    rej = configs["rejection"]
    rows += sampling("rejection", rej.sample, rej.ray, args, True) + [lm_train("rejection:train", rej, args)]
    rows += ppo(configs["ppo"], args)
    for name in ("gatt", "distill"):
        cfg = configs[name]
        rows += sampling(name, cfg.sample, cfg.ray, args, name == "distill") + [lm_train(f"{name}:train", cfg, args)]
    rows += evaluate(configs["evaluate"], args)
    return rows


def fits(row: Row, gpu_bytes: float, reserve: float) -> bool | None:
    """None where the stage is not on a GPU (CPU profiles, the driver)."""
    return row.total <= (1 - reserve) * gpu_bytes if row.device == "gpu" else None


def table(rows: list[Row], gpu_bytes: float, reserve: float) -> str:
    cols = ["stage", "strategy", "workers", "params", "grads", "optim", "copies", "act (no AC / AC)", "KV cache",
            "logits", "total", "fits"]
    lines = []
    for r in rows:
        gib = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        act = f"{gib(r.act_no_ac)}{'' if r.checkpointing else '*'} / {gib(r.act_ac)}{'*' if r.checkpointing else ''}"
        ok = fits(r, gpu_bytes, reserve)
        lines.append([r.stage, r.strategy, str(r.workers), gib(r.params), gib(r.grads), gib(r.optimizer),
                      gib(r.copies), act, gib(r.kv_cache), gib(r.logits), gib(r.total),
                      r.device if ok is None else ("yes" if ok else "NO")])
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])

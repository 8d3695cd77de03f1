"""`vlrl plan`: the GPU memory an RL config needs, per worker group, from the model's config.json
alone (the model is built on the meta device: no weights are read).

Per GPU, in bytes (P parameters, N ranks of a group, c bytes per compute element: 2 for bfloat16):
  trainer (actor, critic)  master copy 4P/N (float32), gradients 4P/N, Adam moments 8P/N, and the
                           actor's weight average 4P/N with actor_ema (counted with the moments);
                           with fsdp.cpu_offload these live in CPU memory instead. Weights: the
                           compute copies of the blocks FSDP gathers, two blocks in flight
                           (2 x largest block x c; with fsdp.wrap: root the block is the whole
                           model); unsharded (N = 1) a bfloat16 copy of the model.
  frozen (reference, RM)   weights cP/N plus the gathered blocks.
  activations              per decoder layer and sequence of s tokens (micro-batch b, hidden h),
                           17 c s b h bytes kept for backward (Korthikanti et al. 2022, eq. 1 at
                           2-byte activations, flash attention: no s^2 term); with
                           fsdp.grad_checkpointing only each layer's input (c s b h) plus one layer's
                           recomputation. Logits: 2c s b V in training (logits and their gradient),
                           c s b V in a forward, plus the float32 log-softmax of ppo.entropy_chunk
                           positions at a time (4 chunk b V; the whole sequence without a chunk).
  rollout replica          bf16 weights 2P/t over its t tensor-parallel GPUs; the KV cache is what
                           rollout.gpu_memory_utilization of the GPU leaves; a replica holds
                           t KV / (4 layers kv_heads head_dim) tokens.
Placement split: every group on GPUs of its own. colocated: every group on the same GPUs (trainer
ranks = GPUs); a GPU holds the trainers' resident state plus the larger of the rollout phase
(engine weights + KV cache) and the update phase (activations, gathered blocks): the engines sleep
while the trainers update.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from rl.config import RLConfig

GIB = 2**30
ENGINE_OVERHEAD = 2 * GIB      # vLLM's own activations and CUDA graphs inside its share of the GPU


@dataclass(frozen=True)
class ModelFigures:
    """What the memory plan needs to know of a model."""

    family: str
    params: int                 # all parameters
    vision: int                 # the vision tower without its merger
    merger: int                 # the merger(s) projecting vision features into the LLM
    llm: int                    # decoder, embeddings and LM head
    lm_head: int
    hidden: int
    layers: int
    vocab: int
    kv_heads: int
    head_dim: int
    largest_block: int          # parameters of the largest block FSDP shards on its own


def model_figures(path: str | Path) -> ModelFigures:
    """Figures of the model whose config.json is at `path` (a model folder or the file itself)."""
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path if path.is_dir() else path.parent)) if path.is_dir() or \
        path.name == "config.json" else AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    named = dict(model.named_parameters())
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    largest = max((sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in blocks),
                  default=0)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelFigures(
        family=config.model_type, params=sum(p.numel() for p in named.values()),
        vision=sum(p.numel() for n, p in named.items() if ".visual." in f".{n}" and "merger" not in n),
        merger=sum(p.numel() for n, p in named.items() if ".visual." in f".{n}" and "merger" in n),
        llm=sum(p.numel() for n, p in named.items() if ".visual." not in f".{n}"),
        lm_head=sum(p.numel() for n, p in named.items() if n.startswith("lm_head.")),
        hidden=text.hidden_size, layers=text.num_hidden_layers, vocab=text.vocab_size,
        kv_heads=text.num_key_value_heads, head_dim=head_dim, largest_block=largest)


@dataclass(frozen=True)
class GroupMemory:
    """Bytes per GPU of one worker group."""

    name: str
    gpus: int                   # GPUs the group runs on
    weights: float = 0.0
    grads: float = 0.0
    master: float = 0.0
    optim: float = 0.0
    activations: float = 0.0
    engine_weights: float = 0.0
    kv_cache: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self) if f.name not in ("name", "gpus"))


def activation_bytes(*, micro_batch: int, seq_len: int, hidden: int, layers: int, vocab: int, compute_bytes: int,
                     train: bool, checkpointing: bool, logp_chunk: int = 0) -> float:
    """Activations of one micro-batch (see the module docstring); `logp_chunk` positions at a time
    are upcast to float32 for the log-softmax (ppo.entropy_chunk; 0: the whole sequence)."""
    per_layer = 17 * compute_bytes * seq_len * micro_batch * hidden
    tokens = seq_len * micro_batch
    upcast = 4 * (min(logp_chunk, seq_len) if logp_chunk else seq_len) * micro_batch * vocab
    if not train:
        return per_layer + tokens * vocab * compute_bytes + upcast
    kept = layers * compute_bytes * tokens * hidden + per_layer if checkpointing else layers * per_layer
    return kept + tokens * vocab * 2 * compute_bytes + upcast


def trainer_memory(name: str, params: int, *, ranks: int, train: bool, compute_bytes: int, offload: bool,
                   largest_block: int, activations: float, ema: bool = False) -> GroupMemory:
    """A trainer (train=True: float32 master, gradients, Adam, with `ema` a float32 weight average
    counted with Adam's moments) or a frozen model on `ranks` GPUs."""
    if ranks > 1:
        weights = 2 * largest_block * compute_bytes
    else:
        weights = params * compute_bytes if (compute_bytes != 4 or not train) else 0.0
    if not train:
        stored = compute_bytes * params / ranks if ranks > 1 else 0.0
        return GroupMemory(name, ranks, weights=weights + stored, activations=activations)
    shard = 0.0 if offload else params / ranks
    return GroupMemory(name, ranks, weights=weights, grads=4 * shard, master=4 * shard,
                       optim=(12 if ema else 8) * shard, activations=activations)


def engine_memory(params: int, *, replicas: int, tp: int, gpu_bytes: float, utilization: float) -> GroupMemory:
    weights = 2 * params / tp
    return GroupMemory("rollout", replicas * tp, engine_weights=weights,
                       kv_cache=max(0.0, utilization * gpu_bytes - weights - ENGINE_OVERHEAD))


@dataclass(frozen=True)
class Plan:
    groups: list[GroupMemory]
    placement: str
    gpus: int                   # GPUs the cluster has
    gpus_needed: int
    gpu_bytes: float
    per_gpu: float              # the fullest GPU
    kv_tokens: int              # tokens the KV cache of one replica holds
    max_model_len: int
    advice: list[str]

    @property
    def fits(self) -> bool:
        return self.gpus_needed <= self.gpus and self.per_gpu <= self.gpu_bytes and self.kv_tokens >= self.max_model_len


def plan(cfg: RLConfig, m: ModelFigures, *, gpus_per_node: int, nodes: int, gpu_memory_gib: float,
         rm: ModelFigures | None = None) -> Plan:
    """The memory per GPU of every worker group of `cfg` on `nodes` x `gpus_per_node` GPUs."""
    r, ro, fsdp = cfg.ray, cfg.rollout, cfg.fsdp
    gpu_bytes = gpu_memory_gib * GIB
    cb = 2 if cfg.dtype == "bfloat16" else 4
    seq = ro.max_model_len
    act = dict(micro_batch=cfg.ppo.micro_batch_size, seq_len=seq, hidden=m.hidden, layers=m.layers, vocab=m.vocab,
               compute_bytes=cb, logp_chunk=cfg.ppo.entropy_chunk)
    critic_params = m.params - m.lm_head + m.hidden + 1
    if fsdp.wrap == "root":   # the whole model is the one block FSDP gathers
        m = dataclasses.replace(m, largest_block=m.params)
    groups = [trainer_memory("actor", m.params, ranks=r.actor_workers, train=True, compute_bytes=cb,
                             offload=fsdp.cpu_offload, largest_block=m.largest_block,
                             activations=activation_bytes(**act, train=True, checkpointing=fsdp.grad_checkpointing),
                             ema=cfg.actor_ema > 0)]
    if cfg.algo == "ppo":
        groups.append(trainer_memory("critic", critic_params, ranks=r.critic_workers, train=True, compute_bytes=cb,
                                     offload=fsdp.cpu_offload, largest_block=m.largest_block,
                                     activations=activation_bytes(**{**act, "vocab": 1}, train=True,
                                                                  checkpointing=fsdp.grad_checkpointing)))
    if cfg.kl.default or any(cfg.kl.coefs.values()):
        groups.append(trainer_memory("reference", m.params, ranks=r.ref_workers, train=False, compute_bytes=cb,
                                     offload=False, largest_block=m.largest_block,
                                     activations=activation_bytes(**act, train=False, checkpointing=False)))
    if cfg.reward_model and r.reward_gpus:   # one whole RM per reward worker
        rm = rm or m
        g = trainer_memory("reward model", rm.params - rm.lm_head, ranks=1, train=False, compute_bytes=cb,
                           offload=False, largest_block=rm.largest_block,
                           activations=activation_bytes(**{**act, "vocab": 1}, train=False, checkpointing=False))
        groups.append(dataclasses.replace(g, gpus=r.reward_workers))
    engine = engine_memory(m.params, replicas=ro.replicas, tp=ro.tensor_parallel_size, gpu_bytes=gpu_bytes,
                           utilization=ro.gpu_memory_utilization)
    groups.append(engine)
    trainers = [g for g in groups if g.name != "rollout"]
    if r.placement == "colocated":
        gpus_needed = max(g.gpus for g in groups)
        resident = sum(g.grads + g.master + g.optim + (g.weights if g.name in ("reference", "reward model") else 0)
                       for g in trainers)
        update = max(g.activations + (g.weights if g.name not in ("reference", "reward model") else 0) for g in trainers)
        per_gpu = resident + max(engine.engine_weights + engine.kv_cache + ENGINE_OVERHEAD, update)
    else:
        gpus_needed = sum(g.gpus for g in groups)
        per_gpu = max([g.total for g in trainers] + [engine.engine_weights + engine.kv_cache + ENGINE_OVERHEAD])
    kv_per_token = 4 * m.layers * m.kv_heads * m.head_dim
    kv_tokens = int(engine.kv_cache * ro.tensor_parallel_size // kv_per_token)   # each GPU holds kv_heads / tp
    p = Plan(groups, r.placement, gpus_per_node * nodes, gpus_needed, gpu_bytes, per_gpu, kv_tokens, seq, [])
    return dataclasses.replace(p, advice=advice(p, cfg, m))


def advice(p: Plan, cfg: RLConfig, m: ModelFigures) -> list[str]:
    """What to change when the plan does not fit."""
    out = []
    if p.gpus_needed > p.gpus:
        out.append(f"the groups need {p.gpus_needed} GPUs and the cluster has {p.gpus}: fewer workers or replicas, "
                   "or ray.placement: colocated (every group on the same GPUs)")
    over = p.per_gpu - p.gpu_bytes
    if over > 0:
        for g in p.groups:
            if g.name in ("actor", "critic") and g.gpus:
                need = math.ceil((g.master + g.grads + g.optim) * g.gpus / max(1.0, p.gpu_bytes * 0.6))
                if need > g.gpus:
                    key = "actor_workers" if g.name == "actor" else "critic_workers"
                    out.append(f"{g.name}: its float32 states take {fmt(g.master + g.grads + g.optim)} per GPU over "
                               f"{g.gpus} ranks; ray.{key}: {need} brings them to {fmt((g.master + g.grads + g.optim) * g.gpus / need)}")
        if not cfg.fsdp.cpu_offload:
            saved = sum(g.master + g.grads + g.optim for g in p.groups)
            out.append(f"fsdp.cpu_offload: true keeps master weights, gradients and optimizer state in CPU "
                       f"memory (saves up to {fmt(saved)} per GPU, at the cost of update speed)")
        if not cfg.fsdp.grad_checkpointing:
            out.append("fsdp.grad_checkpointing: true keeps one input per layer instead of every activation")
        out.append(f"a smaller ppo.micro_batch_size (now {cfg.ppo.micro_batch_size}) or rollout.max_model_len "
                   f"(now {cfg.rollout.max_model_len}) shrinks the activations")
    if p.kv_tokens < p.max_model_len:
        out.append(f"the KV cache of a replica holds {p.kv_tokens} tokens, less than one sequence of "
                   f"{p.max_model_len}: a larger rollout.tensor_parallel_size or rollout.gpu_memory_utilization")
    return out


def fmt(b: float) -> str:
    return f"{b / GIB:.1f}"


def format_plan(p: Plan, m: ModelFigures) -> str:
    lines = [f"{m.family}: {m.params / 1e9:.2f}B parameters (vision {m.vision / 1e9:.2f}B, merger "
             f"{m.merger / 1e6:.0f}M, LLM {m.llm / 1e9:.2f}B); placement {p.placement}, {p.gpus} GPUs of "
             f"{p.gpu_bytes / GIB:.0f} GiB",
             f"{'GiB per GPU':<14}{'GPUs':>5}{'weights':>9}{'grads':>8}{'master':>8}{'optim':>8}{'activ.':>8}"
             f"{'engine':>8}{'KV':>8}{'total':>8}"]
    for g in p.groups:
        lines.append(f"{g.name:<14}{g.gpus:>5}{fmt(g.weights):>9}{fmt(g.grads):>8}{fmt(g.master):>8}"
                     f"{fmt(g.optim):>8}{fmt(g.activations):>8}{fmt(g.engine_weights):>8}{fmt(g.kv_cache):>8}"
                     f"{fmt(g.total):>8}")
    lines.append(f"fullest GPU: {fmt(p.per_gpu)} of {fmt(p.gpu_bytes)} GiB; GPUs needed {p.gpus_needed} of {p.gpus}; "
                 f"KV cache of a replica: {p.kv_tokens:,} tokens (max_model_len {p.max_model_len:,})")
    lines.append("fits" if p.fits else "does not fit")
    lines += [f"  - {a}" for a in p.advice]
    return "\n".join(lines)

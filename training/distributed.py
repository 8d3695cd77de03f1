"""Data-parallel training on torch.distributed and FSDP2: the process group of a worker group, how a
batch's rows are shared out over its ranks, sharding a model, and full or sharded state dicts.

Every function also works without a process group (a single worker in the driver process): then
the rank is 0, the world has one rank, collectives are no-ops and the model is not sharded.

Conventions:
- Rank r of W takes rows r, r + W, r + 2W, ... of every (mini)batch (`shard_rows`). All ranks run
  the same number of forward/backward passes (FSDP gathers parameters in every forward), so a rank
  with fewer rows pads with passes whose loss is multiplied by 0 (`padded_chunks`).
- FSDP averages gradients over the ranks, so a loss reduced with `rl.algos.aggregate` passes the
  global token (or sequence) count divided by W: the average of the ranks' gradients is then the
  gradient of the global token-mean, whatever W.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Literal, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class FSDPConfig:
    """How a worker group shards its model (FSDP2)."""

    grad_checkpointing: bool = False   # recompute each decoder layer's activations in backward
    cpu_offload: bool = False          # parameters, gradients and optimizer state live in CPU memory
    reshard_after_forward: bool = True # free the gathered parameters after each layer's forward (ZeRO-3)
    # blocks: every decoder layer and vision block is a unit of its own (gathers overlap compute; a
    # rank holds one or two blocks at a time). root: the whole model is one unit: one all-gather and
    # one reduce-scatter per pass, the cheapest for small models whose every collective is latency
    wrap: Literal["blocks", "root"] = "blocks"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> str:
    """This node's address as the other nodes of a cluster reach it."""
    try:
        import ray  # optional: inside a Ray actor, Ray knows the node's address
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def init_group(*, rank: int, world: int, address: str, port: int, timeout_s: float = 600.0) -> None:
    """Join the process group of a worker group: NCCL where this process has a GPU, else gloo."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the ranks (in place; `x` itself without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = x.device
        y = x.to(_comm_device())
        dist.all_reduce(y)
        x.copy_(y.to(device))
    return x


def all_reduce_floats(values: dict[str, float]) -> dict[str, float]:
    """Sum each float of `values` over the ranks (every rank must pass the same keys, in any order)."""
    keys = sorted(values)
    if not keys:
        return {}
    t = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, t.tolist()))


def gather_dicts(part: dict) -> dict:
    """The union of every rank's dict (the ranks' keys are disjoint); `part` itself on one rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return part
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard_rows(rows: Sequence[int], *, rank: int, world: int) -> list[int]:
    """The rows of `rows` that rank `rank` of `world` trains on: every world-th, starting at rank."""
    return list(rows)[rank::world]


def padded_chunks(rows: Sequence[int], size: int, *, total: int, world: int) -> list[tuple[list[int], bool]]:
    """This rank's `rows` in chunks of at most `size`, padded to the chunk count every rank has for
    `total` rows shared out over `world` ranks: (rows, real); a padding chunk repeats a row (the
    first of `rows`, or row 0 where the rank has none) and must contribute nothing."""
    count = math.ceil(math.ceil(total / world) / size) if total else 0
    chunks = [(list(rows[i:i + size]), True) for i in range(0, len(rows), size)]
    pad = [list(rows[:1]) or [0]]
    return chunks + [(pad[0], False)] * (count - len(chunks))


def token_chunks(rows: Sequence[int], lengths: Sequence[int], *, max_tokens: int, max_rows: int) -> list[list[int]]:
    """`rows` longest first, cut into chunks whose padded size (rows x the chunk's longest row, the
    tokens a forward pass computes) stays within `max_tokens`, and of at most `max_rows` rows; a
    row longer than `max_tokens` goes alone. `lengths[r]`: row r's length in tokens."""
    order = sorted(rows, key=lambda r: -int(lengths[r]))   # stable: equal lengths keep their order
    chunks: list[list[int]] = []
    for r in order:
        cur = chunks[-1] if chunks else None
        # longest first: the chunk's width is its first row's, so adding r costs that width once more
        if cur is not None and len(cur) < max_rows and (len(cur) + 1) * int(lengths[cur[0]]) <= max_tokens:
            cur.append(r)
        else:
            chunks.append([r])
    return chunks


def rank_chunks(rows: Sequence[int], *, rank: int, world: int, size: int, lengths: Sequence[int] | None = None,
                max_tokens: int = 0) -> list[tuple[list[int], bool]]:
    """This rank's micro-batches of `rows` (all ranks' rows): (rows, real), as many on every rank.

    max_tokens 0: every world-th row (`shard_rows`) in chunks of `size` rows (`padded_chunks`).
    max_tokens > 0 (token-budget micro-batching): the rows sorted longest first are shared out the
    same way, so each rank gets rows of every length, then cut by `token_chunks` (at most `size`
    rows each); every rank works out every rank's chunk count, so they agree without a collective.
    """
    if max_tokens <= 0 or lengths is None:
        return padded_chunks(shard_rows(rows, rank=rank, world=world), size, total=len(rows), world=world)
    order = sorted(rows, key=lambda r: -int(lengths[r]))
    shares = [token_chunks(shard_rows(order, rank=r, world=world), lengths, max_tokens=max_tokens, max_rows=size)
              for r in range(world)]
    mine = shares[rank]
    pad = (mine[0][:1] if mine else [order[0] if order else 0])
    return [(c, True) for c in mine] + [(pad, False)] * (max(map(len, shares)) - len(mine))


def layer_classes(model: nn.Module) -> set[str]:
    """Class names of the blocks FSDP shards one by one: the model's `_no_split_modules` (HF lists
    the decoder layer and the vision block there)."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    return names


def shard_model(model: nn.Module, cfg: FSDPConfig, *, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap `model` with FSDP2 over all ranks: every decoder layer and vision block, then the root
    (`cfg.wrap` "blocks"), or the root alone ("root").
    Parameters stay in their own dtype (float32: the master copy the optimizer steps); with
    `compute_dtype` (bfloat16) forwards and backwards run in it and gradients reduce in float32."""
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    if cfg.cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    blocks = layer_classes(model) if cfg.wrap == "blocks" else set()
    for m in model.modules():
        if type(m).__name__ in blocks and m is not model:
            fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def scalar(x) -> float:
    """A float from a tensor, a DTensor (its full value) or a number."""
    if isinstance(x, DTensor):
        x = x.full_tensor()
    return float(x)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU: gathered on rank 0 (other ranks get {}), or, unsharded,
    a copy of the state dict. Every rank must call it."""
    if not is_sharded(model):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def iter_full_params(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter and buffer in state-dict order, one at a time: each
    sharded tensor is gathered when its turn comes, so no rank ever holds the whole model. Every
    rank must run the iterator to its end (the gathers are collectives)."""
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        yield name, t.detach()


def _checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                      only: Collection[str] | None) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    if only is not None:
        model_sd = {k: v for k, v in model_sd.items() if k in only}
    return {"model": model_sd} if optimizer is None else {"model": model_sd, "optim": optim_sd}


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 only: Collection[str] | None = None) -> None:
    """Each rank writes its shards of the model (and optimizer) state to the folder `path`
    (torch.distributed.checkpoint); the folder is complete once every rank has returned. `only`:
    the model entries to write (LoRA: the adapters; the frozen base is the folder it came from)."""
    dcp.save(_checkpoint_state(model, optimizer, only), checkpoint_id=str(path))


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 only: Collection[str] | None = None) -> None:
    """Read what `save_sharded` wrote into `model` (and `optimizer`), whatever the number of ranks
    that wrote it; `only` as given to `save_sharded` (the other entries keep their values)."""
    state = _checkpoint_state(model, optimizer, only)
    dcp.load(state, checkpoint_id=str(path))
    keys = set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                          optim_state_dict=state.get("optim", {}),
                          options=StateDictOptions(strict=only is None))
    missing = [k for k in getattr(keys, "missing_keys", []) if only is None or k in only]
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {missing[:5]}")


def has_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / ".metadata").is_file()

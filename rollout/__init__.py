"""Generation engines (vLLM, HF) behind one interface, weight sync, and the rollout worker.

Importing the package loads neither vLLM nor Ray: the vLLM backend imports vLLM when it starts.
"""
from rollout.hf_engine import HFEngine
from rollout.types import Completion, Engine, EngineConfig, Prompt, Sampling, SamplingConfig
from rollout.vllm_engine import VLLMEngine


def make_engine(model: str, cfg: EngineConfig = EngineConfig(), *, seed: int = 0) -> Engine:
    """The configured backend on the HF model folder `model` (weights, config, tokenizer,
    processor); `seed` is the engine's global seed (vLLM's sampler seed when a call gives none)."""
    if not model:
        raise ValueError("make_engine: empty model folder (an HF model folder is required)")
    if cfg.backend == "vllm":
        return VLLMEngine(str(model), cfg, seed=seed)
    if cfg.backend == "hf":
        return HFEngine(str(model), cfg, seed=seed)
    raise ValueError(f"EngineConfig.backend: {cfg.backend!r} is not 'vllm' or 'hf'")


__all__ = ["Completion", "Engine", "EngineConfig", "HFEngine", "Prompt", "Sampling", "SamplingConfig", "VLLMEngine",
           "make_engine"]

"""Generation engines (vLLM, HF) behind one interface, weight sync, and a Ray actor shell.

Importing the package loads neither vLLM nor Ray: `make_engine` imports the chosen backend.
"""
from rollout.types import Completion, Engine, EngineConfig, Prompt, SamplingConfig, make_engine

__all__ = ["Completion", "Engine", "EngineConfig", "Prompt", "SamplingConfig", "make_engine"]

"""Shared fixtures: one tiny VLM and one small synthetic suite per test session (cold imports and
model building cost seconds, so they are built once)."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from model.tiny import TinySpec, build_tiny_vlm
    from rl.synth import corpus_texts

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "hf", corpus_texts(), TinySpec())


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory):
    from rl.synth import write_suite

    out = tmp_path_factory.mktemp("suite")
    write_suite(out, seed=0, n=40, n_heldout=10, n_rl=10)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, processor) loaded once; tests must not train it in place."""
    from model.load import load_vlm

    return load_vlm(tiny_model_dir)

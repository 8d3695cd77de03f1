"""Shared fixtures: one tiny VLM and one small synthetic suite per test session (cold imports and
model building cost seconds, so they are built once)."""
from __future__ import annotations

import os
import shutil
import tempfile

from model.load import load_vlm
from model.tiny import TinySpec, build_tiny_vlm
from recipe.sft import SFTConfig, train_sft
from synth.extra import EXTRA_TASKS, write_full_suite
from synth.suite import SceneSpec, corpus_texts, write_suite
from training.optim import OptimConfig
from training.placement import start_local_ray
from tests import rollout_checks as checks

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "hf", corpus_texts(), TinySpec())


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    write_suite(out, seed=0, n=40, n_heldout=10, n_rl=10)
    return out


@pytest.fixture(scope="session")
def extra_suite_dir(tmp_path_factory):
    """A small suite of the video and multi-image tasks alone."""
    out = tmp_path_factory.mktemp("extra_suite")
    write_full_suite(out, seed=0, n=20, n_heldout=5, n_rl=5, tasks=EXTRA_TASKS)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, processor) loaded once; tests must not train it in place."""
    return load_vlm(tiny_model_dir)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, tiny_model_dir):
    """A short SFT of the tiny VLM on counting + math (about a minute on 2 cores), shared by the SFT
    learning check and the RL tests that need a policy that already emits the format."""
    root = tmp_path_factory.mktemp("sft_run")
    # plain counting questions only: colour binding takes far more than 160 steps to learn
    data = write_suite(root / "data", seed=1, n=600, n_heldout=40, n_rl=40, tasks=("counting", "math"),
                       spec=SceneSpec(color_questions=0.0))
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(data["sft"]), eval_data=str(data["heldout"]),
                    out=str(root / "run"), steps=160, batch_size=16, save_every=0, log_every=20,
                    optim=OptimConfig(lr=3e-4, warmup_steps=20))
    final = train_sft(cfg, progress=False)
    return {"final": final, "run": root / "run", "data": data}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for one test module (Ray tests: `pytest -m ray`)."""
    import ray  # heavy optional import: only Ray tests start it

    tmp = tempfile.mkdtemp(prefix="vlrl-ray-", dir="/tmp")   # Ray's socket paths must stay short
    start_local_ray(num_cpus=2, temp_dir=tmp)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    """A trainer-side copy of the tiny policy, one per test module, that tests may edit (and restore)."""
    return load_vlm(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(suite_dir):
    """The rollout tests' prompts from the session's suite (`tests.rollout_checks.make_prompts`)."""
    return checks.make_prompts(suite_dir)

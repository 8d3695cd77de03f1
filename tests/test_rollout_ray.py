"""Ray smoke test: a RolloutWorker actor holding the vLLM engine on the tiny VLM generates, takes a
weight sync, and generates again; every wait is bounded."""
import importlib.util
import math
import shutil
import tempfile

import pytest

from rollout import EngineConfig, SamplingConfig
from rollout.worker import RolloutWorker
from tests.rollout_checks import make_prompts
from training.placement import start_local_ray

pytestmark = [pytest.mark.ray, pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # a short folder: Ray's socket paths must stay under ~107 characters
    tmp = tempfile.mkdtemp(prefix="vlrl-ray-", dir="/tmp")
    start_local_ray(num_cpus=2, temp_dir=tmp)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def test_worker_generates_syncs_and_generates(local_ray, tiny, tiny_model_dir, suite_dir, tmp_path):
    ray = local_ray
    model, _ = tiny
    cfg = EngineConfig(backend="vllm", max_model_len=512, cache_root=str(tmp_path))
    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(str(tiny_model_dir), cfg)
    try:
        info = ray.get(worker.ping.remote(), timeout=300)  # the engine starts in the actor's constructor
        assert info["backend"] == "vllm" and info["start_seconds"] > 0
        prompts = make_prompts(suite_dir, k=2)
        sp = SamplingConfig(n=2, max_tokens=8, seed=0)
        first = ray.get(worker.generate.remote(prompts, sp), timeout=120)
        assert [len(g) for g in first] == [2] * len(prompts)

        # a zeroed lm_head makes every token equally likely: logp = -log(vocab) everywhere
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["lm_head.weight"].zero_()
        seconds = ray.get(worker.sync_weights.remote(ray.put(state)), timeout=120)
        assert seconds < 30
        uniform = ray.get(worker.generate.remote(prompts, sp), timeout=120)
        vocab = model.lm_head.weight.shape[0]
        assert all(abs(lp + math.log(vocab)) < 1e-4 for g in uniform for c in g for lp in c.logp)

        ray.get(worker.sync_weights.remote(model.state_dict()), timeout=120)
        again = ray.get(worker.generate.remote(prompts, sp), timeout=120)
        assert [c.token_ids for g in again for c in g] == [c.token_ids for g in first for c in g]
        ray.get(worker.close.remote(), timeout=60)
    finally:
        ray.kill(worker)

"""The vLLM backend against the Engine contract (see rollout_checks), on the tiny VLM in-process."""
import importlib.util

import pytest

from model.load import load_vlm
from rollout import EngineConfig, make_engine
from rollout.sequences import encode_prompt, render_prompt
from tests import rollout_checks as checks

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    eng = make_engine(str(tiny_model_dir), EngineConfig(backend="vllm", max_model_len=512,
                                                        cache_root=str(tmp_path_factory.mktemp("vllm-cache"))))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    """A trainer-side copy of the policy that tests may edit (restored after each)."""
    return load_vlm(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(suite_dir):
    return checks.make_prompts(suite_dir)


def test_samples(engine, trainer, prompts):
    checks.check_samples(engine, trainer[0], trainer[1], prompts)


def test_seed_determinism(engine, prompts):
    checks.check_seed_determinism(engine, prompts)


def test_prompt_tokens_match_the_trainer(engine, trainer, prompts):
    """vLLM renders and expands the image placeholders exactly as build_sequences does."""
    from vllm import SamplingParams


    for p in prompts:
        req = {"prompt": render_prompt(engine.processor, p)}
        if p.images:
            req["multi_modal_data"] = {"image": p.images}
        out = engine.llm.generate([req], SamplingParams(max_tokens=1), use_tqdm=False)[0]
        assert list(out.prompt_token_ids) == encode_prompt(trainer[1], p)["input_ids"][0].tolist()


def test_logp_matches_trainer(engine, trainer, prompts):
    checks.check_logp_matches_trainer(engine, *trainer, prompts)


def test_sync_weights(engine, trainer, prompts):
    checks.check_sync(engine, *trainer, prompts)


def test_stop(engine, trainer, prompts):
    checks.check_stop(engine, *trainer, prompts)


def test_vision_tokens_banned(engine, trainer, prompts):
    checks.check_vision_tokens_banned(engine, *trainer, prompts)

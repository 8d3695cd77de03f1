"""The vLLM backend against the Engine contract (see rollout_checks), on the tiny VLM in-process."""
import importlib.util

import pytest

from rollout import EngineConfig, make_engine
from rollout.sequences import encode_prompt, render_prompt
from rollout.vllm_engine import request
from tests import rollout_checks as checks

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    eng = make_engine(str(tiny_model_dir), EngineConfig(backend="vllm", max_model_len=512, max_images_per_prompt=2,
                                                        max_video_clips_per_prompt=8,
                                                        cache_root=str(tmp_path_factory.mktemp("vllm-cache"))))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def media_prompts(extra_suite_dir, trainer):
    return checks.make_media_prompts(extra_suite_dir, trainer[1])


def test_samples(engine, trainer, prompts):
    checks.check_samples(engine, trainer[0], trainer[1], prompts)


def test_seed_determinism(engine, prompts):
    checks.check_seed_determinism(engine, prompts)


def test_prompt_tokens_match_the_trainer(engine, trainer, prompts, media_prompts):
    """vLLM renders and expands the image and video placeholders exactly as build_sequences does."""
    from vllm import SamplingParams

    for p in prompts + media_prompts:
        req = request(engine.processor, p, engine.limits)
        out = engine.llm.generate([req], SamplingParams(max_tokens=1), use_tqdm=False)[0]
        assert list(out.prompt_token_ids) == encode_prompt(trainer[1], p)["input_ids"][0].tolist()
    assert render_prompt(engine.processor, media_prompts[0]).count("<|video_pad|>") == len(media_prompts[0].videos)


def test_a_prompt_over_the_engine_limits_names_the_setting(engine, media_prompts):
    p = media_prompts[1]
    two = type(p)(p.messages, p.images * 2, p.videos)
    with pytest.raises(ValueError, match=r"4 image input\(s\) but the engine takes at most 2 \(rollout.max_images_per_prompt\)"):
        request(engine.processor, two, engine.limits)


def test_logp_matches_trainer(engine, trainer, prompts):
    checks.check_logp_matches_trainer(engine, *trainer, prompts)


def test_sync_weights(engine, trainer, prompts):
    checks.check_sync(engine, *trainer, prompts)


def test_stop(engine, trainer, prompts):
    checks.check_stop(engine, *trainer, prompts)


def test_vision_tokens_banned(engine, trainer, prompts):
    checks.check_vision_tokens_banned(engine, *trainer, prompts)


def test_video_and_multi_image_samples(engine, trainer, media_prompts):
    checks.check_samples(engine, trainer[0], trainer[1], media_prompts)


def test_logp_matches_trainer_on_video_and_multi_image(engine, trainer, media_prompts):
    """The trainer's log-probs of the engine's samples agree on timestamped video clips and on two
    images per prompt, as on one image."""
    checks.check_logp_matches_trainer(engine, *trainer, media_prompts)

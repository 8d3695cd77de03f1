"""The HF transformers backend against the Engine contract (see rollout_checks)."""
import pytest

from rollout import EngineConfig, make_engine
from tests import rollout_checks as checks


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = make_engine(str(tiny_model_dir), EngineConfig(backend="hf"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def media_prompts(extra_suite_dir, trainer):
    return checks.make_media_prompts(extra_suite_dir, trainer[1])


def test_samples(engine, trainer, prompts):
    checks.check_samples(engine, trainer[0], trainer[1], prompts)


def test_seed_determinism(engine, prompts):
    checks.check_seed_determinism(engine, prompts)


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

"""Backend-agnostic checks of the `rollout.Engine` contract, run by test_rollout_hf / test_rollout_vllm
on one engine each (engines start once per module)."""
from __future__ import annotations

import contextlib

import torch

from model.logprobs import token_logp
from records import VideoGeometry, load_images, load_records
from rollout import Prompt, SamplingConfig
from rollout.sequences import build_sequences, prompt_from_record, vision_token_ids

# Measured max |engine logp - trainer logp| on the tiny VLM in float32: 1e-6 (as built) to 3e-6
# (after perturbing every weight); the bound leaves room for other CPUs' summation orders.
LOGP_TOL = 2e-5


def make_prompts(suite_dir, k: int = 3) -> list[Prompt]:
    """k image prompts of different tasks from the synthetic RL split, and one text-only prompt."""
    recs, seen = [], set()
    for r in load_records(suite_dir / "rl.jsonl"):
        if r.task not in seen:
            seen.add(r.task)
            recs.append(r)
    prompts = [Prompt(r.prompt_messages, load_images(r)) for r in recs[:k]]
    return prompts + [Prompt([{"role": "user", "content": [{"type": "text", "text": "Say a colour."}]}], [])]


def make_media_prompts(extra_suite_dir, processor) -> list[Prompt]:
    """A video prompt of each video task (timestamped clips) and a two-image prompt (spot the
    difference), from the extra suite's RL split, as the RL driver builds them."""
    recs = load_records(extra_suite_dir / "rl.jsonl")
    picked = [next(r for r in recs if r.task == t) for t in ("video_temporal", "spot_difference", "video_count")]
    return [prompt_from_record(r, VideoGeometry.of(processor)) for r in picked]


def eos_ids(processor, model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set([eos] if isinstance(eos, int) else eos) | {processor.tokenizer.eos_token_id}


def trainer_logp(model, processor, prompts, completions) -> torch.Tensor:
    """The trainer-side log-prob of every sampled token, flattened in [prompt][sample][token] order."""
    seq = build_sequences(processor, prompts, completions)
    with torch.no_grad():
        logits = model(**seq.model_inputs()).logits
    logp = token_logp(logits[:, :-1], seq.input_ids[:, 1:])  # (B, L-1)
    return logp[seq.label_mask.bool()]


def flat_logp(completions) -> torch.Tensor:
    return torch.tensor([x for group in completions for c in group for x in c.logp])


def max_logp_diff(engine, model, processor, prompts, sampling) -> float:
    out = engine.generate(prompts, sampling)
    return (trainer_logp(model, processor, prompts, out) - flat_logp(out)).abs().max().item()


@contextlib.contextmanager
def modified_weights(engine, model):
    """Edit `model` in the body, then sync it into the engine; afterwards restore both."""
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(original)
        engine.sync_weights(model.state_dict())


def check_samples(engine, model, processor, prompts):
    n, max_tokens = 3, 12
    out = engine.generate(prompts, SamplingConfig(n=n, max_tokens=max_tokens, seed=3))
    assert len(out) == len(prompts) and all(len(g) == n for g in out)
    eos = eos_ids(processor, model)
    for group in out:
        for c in group:
            assert 0 < len(c.token_ids) == len(c.logp) <= max_tokens
            assert all(lp <= 0 for lp in c.logp)
            assert isinstance(c.text, str)
            if c.finish_reason == "length":
                assert len(c.token_ids) == max_tokens and not eos & set(c.token_ids)
            else:
                assert c.finish_reason == "stop" and c.token_ids[-1] in eos
        assert len({tuple(c.token_ids) for c in group}) > 1, "n samples of one prompt are all equal"


def check_seed_determinism(engine, prompts):
    sp = SamplingConfig(n=2, max_tokens=10, seed=11)
    a, b = engine.generate(prompts, sp), engine.generate(prompts, sp)
    assert [c.token_ids for g in a for c in g] == [c.token_ids for g in b for c in g]
    torch.testing.assert_close(flat_logp(a), flat_logp(b), rtol=0, atol=1e-6)
    c = engine.generate(prompts, SamplingConfig(n=2, max_tokens=10, seed=12))
    assert [x.token_ids for g in a for x in g] != [x.token_ids for g in c for x in g]


def check_logp_matches_trainer(engine, model, processor, prompts) -> float:
    diff = max_logp_diff(engine, model, processor, prompts, SamplingConfig(n=2, max_tokens=16, seed=5))
    assert diff < LOGP_TOL
    return diff


def check_sync(engine, model, processor, prompts) -> dict[str, float]:
    """A vision-only change (the stale-encoder-cache case), then every weight, then the original."""
    sp = SamplingConfig(n=2, max_tokens=16, seed=21)
    before = engine.generate(prompts, sp)
    gen = torch.Generator().manual_seed(0)
    diffs = {}
    with modified_weights(engine, model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".visual." in f".{name}":
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
        engine.sync_weights(model.state_dict())
        after = engine.generate(prompts, sp)
        image_rows = [i for i, p in enumerate(prompts) if p.images]
        assert any(before[i][0].logp != after[i][0].logp for i in image_rows), "vision update had no effect"
        text_only = [i for i, p in enumerate(prompts) if not p.images]
        for i in text_only:  # the text path did not change: same samples, same log-probs
            assert [c.token_ids for c in before[i]] == [c.token_ids for c in after[i]]
        diffs["vision"] = (trainer_logp(model, processor, prompts, after) - flat_logp(after)).abs().max().item()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        engine.sync_weights(model.state_dict())
        diffs["all"] = max_logp_diff(engine, model, processor, prompts, sp)
    restored = engine.generate(prompts, sp)  # the context manager synced the original weights back
    assert [c.token_ids for g in before for c in g] == [c.token_ids for g in restored for c in g]
    diffs["restored"] = (flat_logp(before) - flat_logp(restored)).abs().max().item()
    assert diffs["vision"] < LOGP_TOL and diffs["all"] < LOGP_TOL and diffs["restored"] < LOGP_TOL
    return diffs


def _favour(model, winners: list[int], gen: torch.Generator, scale: float) -> None:
    """Give the pair `winners` the logits +scale*u.h and -scale*u.h (u a random unit vector, h the
    final hidden state): at each position one of them out-scores the rest by ~scale*|u.h|."""
    w = model.lm_head.weight
    u = torch.nn.functional.normalize(torch.randn(w.shape[1], generator=gen), dim=0)
    with torch.no_grad():
        w[winners[0]] = scale * u
        w[winners[1]] = -scale * u


def check_stop(engine, model, processor, prompts):
    """A policy that always emits an EOS token: every sample is that one token, finish_reason 'stop'."""
    eos = sorted(eos_ids(processor, model))
    assert len(eos) >= 2, "the tiny model lists two EOS ids (<|im_end|>, <|endoftext|>)"
    with modified_weights(engine, model):
        _favour(model, eos[:2], torch.Generator().manual_seed(1), scale=1e4)
        engine.sync_weights(model.state_dict())
        out = engine.generate(prompts, SamplingConfig(n=2, max_tokens=8, seed=0))
        for group in out:
            for c in group:
                assert c.finish_reason == "stop" and len(c.token_ids) == 1 and c.token_ids[0] in eos
                assert c.text == "" and c.logp[0] > -1e-3


def check_vision_tokens_banned(engine, model, processor, prompts):
    """A policy that prefers vision placeholder tokens still never samples them (the trainer would
    read a sampled <|image_pad|> as an image slot); log-probs stay the raw ones."""
    banned = vision_token_ids(processor)
    with modified_weights(engine, model):
        _favour(model, banned[:2], torch.Generator().manual_seed(2), scale=30.0)
        engine.sync_weights(model.state_dict())
        sp = SamplingConfig(n=2, max_tokens=8, seed=0)
        out = engine.generate(prompts, sp)
        assert not set(banned) & {t for g in out for c in g for t in c.token_ids}
        engine_logp = flat_logp(out)
        assert engine_logp.mean() < -5, "the sampled tokens should be the unlikely non-vision ones"
        # raw log-probs of magnitude ~30-100 here: float32 rounding calls for a relative bound too
        torch.testing.assert_close(engine_logp, trainer_logp(model, processor, prompts, out), rtol=1e-5, atol=LOGP_TOL)

"""Sequence packing (`model.packing`, `ppo.pack_sequences`, SFT's `pack_sequences`): a micro-batch's
rows packed into one row give the log-probs, entropies, values and updates of the padded batch, for
every model family, and no token sees another sequence."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AttentionInterface
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from model.families import FAMILIES
from model.inputs import IGNORE
from model.load import load_processor, load_vlm
from model.packing import Packing, pack_inputs
from model.tiny import TinySpec, build_tiny_vlm
from recipe.sft import SFTConfig, SFTWorker
from records import VideoGeometry, load_records, write_records
from rewards.config import PoolConfig, RewardConfig
from rl.batch import RolloutBatch
from rl.config import KLConfig, PPOConfig, RLConfig, RolloutConfig
from rl.driver import fit
from rl.workers import CriticWorker, PolicyWorker
from rollout.sequences import prompt_from_record
from rollout.types import Prompt
from synth.suite import corpus_texts
from training.optim import OptimConfig
from tests.helpers.batches import random_response_batch

TOL = 1e-5
LR = 1e-3
# An AdamW step moves a weight by up to ~lr; where a gradient is near AdamW's eps, float32 noise in it
# (sums taken in another order, packed) moves that weight by about a percent of lr: equal updates
# agree far closer than lr / 20, a packing bug (a token lost or attended across rows) moves weights by ~lr.
STEP_TOL = LR / 20


def test_packing_moves_tokens_positions_and_labels():
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    p = Packing(valid)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    packed = p.pack(ids)
    assert packed.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert p.positions().tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # a sequence's last token has no label: the next packed token opens another sequence
    assert p.next_tokens(packed).tolist() == [[6, 7, IGNORE, 9, IGNORE, 2, 3, 4, IGNORE]]
    assert torch.equal(p.unpack(packed), ids)
    x = torch.arange(9.0, requires_grad=True)
    p.unpack(x[None]).sum().backward()       # unpacking passes gradients back to every packed token
    assert torch.equal(x.grad, torch.ones(9))


# ----------------------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def family_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pack_families")
    dirs = {"qwen2_vl": tiny_model_dir}
    for name in FAMILIES:
        if name not in dirs:
            dirs[name] = build_tiny_vlm(root / name, corpus_texts(), TinySpec(), family=name)
    return dirs


def mixed_batch(model_dir, suite_dir, extra_suite_dir) -> RolloutBatch:
    """Rows of one image, two images, a video and text alone, two samples each, with responses
    of 3 to 30 tokens: lengths from ~20 to ~250 tokens."""
    processor = load_processor(model_dir)
    geometry = VideoGeometry.of(processor)
    extra = load_records(extra_suite_dir / "rl.jsonl", require="prompt")
    recs = load_records(suite_dir / "rl.jsonl", require="prompt")[:1]
    recs += [next(r for r in extra if len(r.images) == 2), next(r for r in extra if r.videos)]
    prompts = [prompt_from_record(r, geometry) for r in recs]
    prompts.append(Prompt([{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}], [], []))
    return random_response_batch(processor, prompts)


def _optim():
    return OptimConfig(lr=LR, warmup_steps=0, schedule="constant")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_log_probs_entropy_and_values_equal_unpacked(family, family_dirs, suite_dir, extra_suite_dir):
    batch = mixed_batch(family_dirs[family], suite_dir, extra_suite_dir)
    seq = batch.seq
    assert seq.vision.video_grid_thw is not None and int(seq.vision.images_per_row.max()) == 2
    real = seq.attention_mask[:, 1:].bool()          # label positions whose label is a token of the row
    actor = PolicyWorker(str(family_dirs[family]))
    lp, ent = actor.logp(seq, micro_batch_size=32)
    lp_packed, ent_packed = actor.logp(seq, micro_batch_size=32, pack=True)
    assert (lp - lp_packed)[real].abs().max() < TOL
    assert (ent - ent_packed)[real].abs().max() < TOL
    assert lp[real].abs().min() > 0                 # the comparison is over real log-probs
    critic = CriticWorker(str(family_dirs[family]), optim=None)
    values, values_packed = critic.values(seq), critic.values(seq, pack=True)
    assert (values - values_packed)[real].abs().max() < TOL


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def test_no_token_attends_across_a_sequence_boundary(tiny, tiny_model_dir, suite_dir, extra_suite_dir):
    """Changing the first sequence's response changes its own logits, not those of the sequences
    packed after it; numbering the packed row as one sequence (no boundaries) does change them."""
    model, _ = tiny
    seq = mixed_batch(tiny_model_dir, suite_dir, extra_suite_dir).seq
    inputs, _ = pack_inputs(model, seq.model_inputs())
    first = int(seq.lengths[0])                      # the first sequence's tokens are packed[:first]
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    resp = seq.response_mask[0].nonzero().flatten()
    changed["input_ids"][0, resp] = (changed["input_ids"][0, resp] + 1 - 100) % 300 + 100
    base, after = _logits(model, inputs)[0], _logits(model, changed)[0]
    assert (base[:first] - after[:first]).abs().max() > 1e-3
    assert (base[first:] - after[first:]).abs().max() < 1e-6
    # the check can fail: one running text position makes the mask causal over the whole packed row
    n = inputs["input_ids"].shape[1]
    leaky = dict(inputs, position_ids=inputs["position_ids"].clone())
    leaky["position_ids"][0, 0] = torch.arange(n)
    leaky_after = dict(leaky, input_ids=changed["input_ids"])
    assert (_logits(model, leaky)[0, first:] - _logits(model, leaky_after)[0, first:]).abs().max() > 1e-3


def _varlen_sdpa(module, query, key, value, attention_mask, *, scaling, position_ids=None, **kwargs):
    """Flash-attention-style varlen on the CPU: transformers gives a packed row no mask; each
    sequence's span comes from the text positions (as flash_attn_varlen_func gets its cu_seqlens)."""
    assert attention_mask is None
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
    bounds = cu_seqlens.tolist()
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling, enable_gqa=True)
        for s, e in zip(bounds[:-1], bounds[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("vlrl_varlen_check", _varlen_sdpa)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "vlrl_varlen_check"])
def test_packed_logits_equal_padded_ones_with_each_attention(attention, tiny_model_dir, suite_dir, extra_suite_dir):
    """sdpa and eager get a block-diagonal mask from transformers; flash attention gets no mask and
    reads the boundaries from the position ids (`vlrl_varlen_check` emulates it with sdpa per sequence)."""
    model, _ = load_vlm(tiny_model_dir)
    seq = mixed_batch(tiny_model_dir, suite_dir, extra_suite_dir).seq
    if attention != "vlrl_varlen_check":
        model.set_attn_implementation(attention)
    ref = _logits(model, seq.model_inputs())
    model.set_attn_implementation({"text_config": attention, "vision_config": "sdpa"})
    inputs, packing = pack_inputs(model, seq.model_inputs())
    packed = packing.unpack(_logits(model, inputs))
    assert (ref - packed)[seq.attention_mask.bool()].abs().max() < TOL


def test_packed_updates_give_the_same_weights(tiny_model_dir, suite_dir, extra_suite_dir):
    batch = mixed_batch(tiny_model_dir, suite_dir, extra_suite_dir)
    mask = batch.mask
    a, b = (PolicyWorker(str(tiny_model_dir), optim=_optim(), seed=0) for _ in range(2))
    batch.old_logp, _ = a.logp(batch.seq)
    g = torch.Generator().manual_seed(1)
    batch.ref_logp = batch.old_logp + 0.01 * torch.randn(mask.shape, generator=g)
    batch.adv = torch.randn(mask.shape, generator=g) * mask
    mb = [list(range(0, batch.rows, 2)), list(range(1, batch.rows, 2))]
    kw = dict(kl_mode="loss", kl_kind="k3", minibatch_rows=mb, entropy=True)
    ma = a.update(batch, ppo=PPOConfig(micro_batch_size=3, lm_coef=0.1), **kw)
    mb_ = b.update(batch, ppo=PPOConfig(micro_batch_size=3, lm_coef=0.1, pack_sequences=True), **kw)
    for k in ("actor/loss", "actor/grad_norm", "actor/lm_loss", "actor/kl_loss_kl", "response/entropy"):
        assert abs(ma[k] - mb_[k]) < TOL * max(1.0, abs(ma[k])), k
    start = PolicyWorker(str(tiny_model_dir)).model.parameters()
    assert max((pa - p0).abs().max().item() for pa, p0 in zip(a.model.parameters(), start)) > 1e-4   # it stepped
    assert max((pa - pb).abs().max().item() for pa, pb in zip(a.model.parameters(), b.model.parameters())) < STEP_TOL

    c1, c2 = (CriticWorker(str(tiny_model_dir), optim=_optim()) for _ in range(2))
    batch.values = c1.values(batch.seq)
    batch.returns = batch.values + batch.adv
    m1 = c1.update(batch, ppo=PPOConfig(micro_batch_size=3), minibatch_rows=mb)
    m2 = c2.update(batch, ppo=PPOConfig(micro_batch_size=3, pack_sequences=True), minibatch_rows=mb)
    assert abs(m1["critic/loss"] - m2["critic/loss"]) < TOL and abs(m1["critic/grad_norm"] - m2["critic/grad_norm"]) < TOL
    assert max((p1 - p2).abs().max().item() for p1, p2 in zip(c1.model.parameters(), c2.model.parameters())) < STEP_TOL


def test_packed_sft_step_gives_the_same_loss_and_weights(tmp_path, tiny_model_dir, extra_suite_dir):
    """Video and two-image SFT records (one packed pass per modality group)."""
    def worker(pack: bool) -> SFTWorker:
        return SFTWorker(SFTConfig(model=str(tiny_model_dir), data=str(extra_suite_dir / "sft.jsonl"),
                                   out=str(tmp_path / str(pack)), steps=1, batch_size=6, optim=_optim(),
                                   pack_sequences=pack))
    a, b = worker(False), worker(True)
    ma, mb = a.train_step(0), b.train_step(0)
    assert ma["tokens"] == mb["tokens"] > 0
    assert abs(ma["nll"] - mb["nll"]) < TOL * ma["nll"] and abs(ma["grad_norm"] - mb["grad_norm"]) < TOL
    assert max((pa - pb).abs().max().item() for pa, pb in zip(a.model.parameters(), b.model.parameters())) < STEP_TOL


def test_an_rl_step_with_packing_matches_one_without(tmp_path, tiny_model_dir, suite_dir):
    """The driver hands `ppo.pack_sequences` to every pass (actor and reference log-probs, values, both
    updates): one seeded PPO step (KL in the loss) gives the same metrics and weights either way."""
    data = tmp_path / "counting.jsonl"
    write_records(data, [r for r in load_records(suite_dir / "rl.jsonl", require="prompt") if r.task == "counting"])

    def run(pack: bool) -> tuple[dict, dict]:
        out = tmp_path / f"pack-{pack}"
        cfg = RLConfig(policy=str(tiny_model_dir), data=str(data), out=str(out), steps=1, prompts_per_step=3,
                       rollout=RolloutConfig(backend="hf", n=2, max_tokens=16),
                       reward=RewardConfig(pool=PoolConfig(workers=0)), kl=KLConfig(default=0.05, mode="loss"),
                       ppo=PPOConfig(minibatches=1, micro_batch_size=4, pack_sequences=pack), save_every=0,
                       actor_optim=_optim(), critic_optim=_optim())
        final = fit(cfg, progress=False)
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0]), load_file(final / "model.safetensors")
    (m0, w0), (m1, w1) = run(False), run(True)
    for k in ("actor/loss", "actor/grad_norm", "actor/kl_loss_kl", "critic/loss", "response/entropy"):
        assert abs(m0[k] - m1[k]) < TOL * max(1.0, abs(m0[k])), k
    start = load_file(tiny_model_dir / "model.safetensors")
    assert max((w0[k] - start[k]).abs().max().item() for k in w0) > 5e-4        # AdamW moved weights by ~lr (1e-3)
    # ... where a gradient is near zero, by lr x its float32 noise's sign: a tenth of a step at most
    assert max((w0[k] - w1[k]).abs().max().item() for k in w0) < 1e-4

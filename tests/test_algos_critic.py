"""model.critic on the tiny VLM: shapes, save/load, init from a policy folder, it fits returns."""
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from model.critic import VALUE_HEAD_FILE, ValueModel
from model.tiny import build_tiny_vlm
from rl.algos import value_loss
from synth.suite import corpus_texts


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "m", corpus_texts(n=20))


@pytest.fixture(scope="module")
def critic(tiny_vlm):
    torch.manual_seed(0)
    return ValueModel.from_pretrained(tiny_vlm)


def text_batch(vocab, B=2, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, :3] = 0  # left padding, as the rollout engine leaves it
    return ids, attn


def test_forward_shapes_text(critic):
    ids, attn = text_batch(critic.backbone.config.get_text_config().vocab_size)
    values = critic(ids, attn)
    assert values.shape == ids.shape and values.dtype == torch.float32 and torch.isfinite(values).all()


def test_forward_with_image(tiny_vlm, critic):
    proc = AutoProcessor.from_pretrained(tiny_vlm)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]},
            {"role": "assistant", "content": "<think>two</think>2"}]
    enc = proc(text=[proc.apply_chat_template(msgs, tokenize=False)], images=[Image.new("RGB", (84, 84), "red")],
               return_tensors="pt")
    values = critic(enc["input_ids"], enc["attention_mask"], pixel_values=enc["pixel_values"],
                    image_grid_thw=enc["image_grid_thw"], mm_token_type_ids=enc["mm_token_type_ids"])
    assert values.shape == enc["input_ids"].shape and torch.isfinite(values).all()


def test_init_from_policy_folder_and_roundtrip(tiny_vlm, critic, tmp_path):
    policy = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    backbone_sd, policy_sd = critic.backbone.state_dict(), policy.model.state_dict()
    assert backbone_sd.keys() == policy_sd.keys()
    assert all(torch.equal(backbone_sd[k], policy_sd[k]) for k in backbone_sd)

    with torch.no_grad():
        critic.value_head.bias.fill_(0.25)  # make the head distinguishable from a fresh one
    out = critic.save_pretrained(tmp_path / "critic")
    assert (out / VALUE_HEAD_FILE).exists() and (out / "config.json").exists()
    again = ValueModel.from_pretrained(out)
    ids, attn = text_batch(critic.backbone.config.get_text_config().vocab_size)
    critic.eval(), again.eval()
    torch.testing.assert_close(again(ids, attn), critic(ids, attn))


def test_critic_fits_returns_with_the_value_loss(tiny_vlm):
    """The value head on the backbone regresses fixed returns: what value pretraining relies on."""
    torch.manual_seed(0)
    critic = ValueModel.from_pretrained(tiny_vlm)
    ids, attn = text_batch(critic.backbone.config.get_text_config().vocab_size, B=4, L=10, seed=1)
    mask = torch.zeros(4, 10)
    mask[:, 4:9] = 1  # states before the response tokens at positions 5..9
    returns = torch.tensor([1.0, 0.0, 1.0, 0.5])[:, None].expand(4, 10) * mask
    opt = torch.optim.AdamW(critic.parameters(), lr=2e-3)
    history = []
    for _ in range(25):
        values = critic(ids, attn)
        loss, metrics = value_loss(values, values.detach(), returns, mask, clip=None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.item(), metrics["explained_variance"].item()))
    assert history[-1][0] < 0.2 * history[0][0], history
    assert history[-1][1] > history[0][1]

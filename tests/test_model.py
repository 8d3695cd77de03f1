"""The embedded tiny VLM: built locally, deterministic, loadable through the generic loader."""
import json

import torch
from safetensors.torch import load_file

from model.inputs import IGNORE, encode_prompts, encode_sft
from model.load import load_vlm, save_vlm
from model.tiny import SPECIAL_TOKENS, THINK_TOKENS, TinySpec, build_tiny_vlm
from records import load_images, load_records
from synth.suite import corpus_texts


def test_build_is_deterministic_for_a_seed(tmp_path, tiny_model_dir):
    again = build_tiny_vlm(tmp_path / "again", corpus_texts(), TinySpec())
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other = build_tiny_vlm(tmp_path / "other", corpus_texts(), TinySpec(seed=1))
    c = load_file(other / "model.safetensors")
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_folder_is_a_standard_qwen2_vl(tiny_model_dir, tiny):
    model, proc = tiny
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_vl"
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    tok = proc.tokenizer
    for t in SPECIAL_TOKENS + THINK_TOKENS:
        assert tok.convert_tokens_to_ids(t) is not None and tok.convert_tokens_to_ids(t) < cfg["text_config"]["vocab_size"]
    assert tok.decode(tok("<think>a</think>3")["input_ids"]) == "<think>a</think>3"
    # head_dim 64: an attention size vLLM's CPU backend supports
    assert cfg["text_config"]["hidden_size"] // cfg["text_config"]["num_attention_heads"] == 64


def test_sft_labels_cover_exactly_the_assistant_turns(tiny, suite_dir):
    model, proc = tiny
    recs = load_records(suite_dir / "sft.jsonl")[::10][:4]
    batch = encode_sft(proc, [r.messages for r in recs], [load_images(r) for r in recs])
    for i, r in enumerate(recs):
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE]
        assert proc.tokenizer.decode(labelled) == r.target + "<|im_end|>\n"
        # image tokens and the prompt are never labelled
        img = batch["input_ids"][i] == model.config.image_token_id
        assert img.sum() == 9 and (batch["labels"][i][img] == IGNORE).all()
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_multi_turn_labels_every_assistant_turn(tiny):
    _, proc = tiny
    conv = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "A2"}]
    batch = encode_sft(proc, [conv], [[]])
    labelled = proc.tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE])
    assert labelled == "A1<|im_end|>\nA2<|im_end|>\n"


def test_generate_and_save_round_trip(tmp_path, tiny, suite_dir):
    model, proc = tiny
    recs = load_records(suite_dir / "heldout.jsonl")[:2]
    inputs = encode_prompts(proc, [r.prompt_messages for r in recs], [load_images(r) for r in recs])
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padded for generation
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 4
    saved = save_vlm(model, proc, tmp_path / "copy")
    again, _ = load_vlm(saved)
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n

"""Greedy decoding with a transformers model in this process: held-out evaluation after SFT and RL.
A prompt that repeats in the records (same messages, same image and video bytes) is decoded once."""
from __future__ import annotations

import torch

from model.inputs import encode_prompts
from records import VideoGeometry, load_media, unique_prompts


def generate_greedy(model, processor, records, *, batch_size: int = 64, max_new_tokens: int = 48) -> list[str]:
    """Greedy responses (special tokens stripped) for prompt records, in order."""
    first, slot = unique_prompts(records)
    distinct = [records[i] for i in first]
    tok = processor.tokenizer
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
    geometry = VideoGeometry.of(processor)
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(distinct), batch_size):
            chunk = distinct[i:i + batch_size]
            media = [load_media(r, geometry=geometry) for r in chunk]
            inputs = encode_prompts(processor, [m.messages for m in media], [m.images for m in media],
                                    [m.videos for m in media])
            inputs = inputs.to(model.device)
            seq = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(seq[:, inputs["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)
    model.train(was_training)
    return [out[j] for j in slot]

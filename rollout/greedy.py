"""Greedy decoding with a transformers model in this process: held-out evaluation after SFT and RL.
A prompt that repeats in the records (same messages, same image and video bytes) is decoded once.

On a model sharded over the ranks of a group (FSDP), every rank decodes its share of the prompts in
the same number of batches, the batches run in step (`synced_gpus`: a rank whose answers ended
keeps taking part in the others' forwards), and every rank returns all the answers.
"""
from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule

from model.inputs import encode_prompts
from records import VideoGeometry, load_media, unique_prompts
from training.distributed import gather_dicts, padded_chunks, rank, shard_rows, world_size


def generate_greedy(model, processor, records, *, batch_size: int = 64, max_new_tokens: int = 48) -> list[str]:
    """Greedy responses (special tokens stripped) for prompt records, in order."""
    first, slot = unique_prompts(records)
    distinct = [records[i] for i in first]
    tok = processor.tokenizer
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
    r, world = rank(), world_size()
    mine = shard_rows(range(len(distinct)), rank=r, world=world)
    out: dict[int, str] = {}
    geometry = VideoGeometry.of(processor)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for rows, real in padded_chunks(mine, batch_size, total=len(distinct), world=world):
            media = [load_media(distinct[i], geometry=geometry) for i in rows]
            inputs = encode_prompts(processor, [m.messages for m in media], [m.images for m in media],
                                    [m.videos for m in media])
            inputs = inputs.to(model.device)
            if isinstance(model, FSDPModule):   # generate calls the vision tower outside the root's forward,
                model.unshard()                 # so FSDP's hooks would leave the root's own weights sharded
            seq = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id, synced_gpus=world > 1)
            texts = tok.batch_decode(seq[:, inputs["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)
            if real:
                out.update(zip(rows, texts))
    if isinstance(model, FSDPModule):
        model.reshard()
    model.train(was_training)
    out = gather_dicts(out)
    return [out[j] for j in slot]

"""Turning chat conversations + images into model inputs, with loss labels on assistant tokens only.

Works with any chat template that renders a conversation as a prefix-stable string (each message
appended after the previous ones), which holds for the Qwen2-VL, Qwen2.5-VL (its default system
prompt included) and Qwen3-VL Instruct templates: the assistant spans
are found by rendering growing prefixes, then mapped onto tokens with the tokenizer's offsets.
"""
from __future__ import annotations

from typing import Sequence

import torch

from model.families import image_token_counts

IGNORE = -100


def _assistant_char_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text of the conversation and the [start, end) character spans of assistant turns
    (content plus the end-of-turn marker the template appends, so the model learns to stop)."""
    text = processor.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = processor.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        end = len(processor.apply_chat_template(messages[: i + 1], tokenize=False))
        if not text.startswith(prefix):
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
        spans.append((len(prefix), end))
    return text, spans


def _expanded_offset(text: str, pos: int, pad: str, counts: list[int]) -> int:
    """Character position `pos` of `text` after each `pad` occurrence became counts[k] copies."""
    shift, k, i = 0, 0, text.find(pad)
    while 0 <= i < pos:
        shift += (counts[k] - 1) * len(pad)
        k += 1
        i = text.find(pad, i + len(pad))
    return pos + shift


def encode_sft(processor, conversations: Sequence[list[dict]], images: Sequence[list]):
    """Batch of SFT inputs: processor outputs + `labels` (-100 except on assistant tokens).

    conversations: B message lists (last turn usually the assistant's); images: B lists of PIL images.
    Returns a dict of tensors (input_ids, attention_mask, pixel_values, image_grid_thw, ..., labels).
    """
    texts, spans = zip(*(_assistant_char_spans(processor, c) for c in conversations))
    flat_images = [im for ims in images for im in ims] or None
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "right"
    try:
        batch = processor(text=list(texts), images=flat_images, return_tensors="pt", padding=True,
                          return_offsets_mapping=True)
    finally:
        processor.tokenizer.padding_side = side
    offsets = batch.pop("offset_mapping")  # (B, L, 2) in the pad-expanded text
    pad = getattr(processor, "image_token", "<|image_pad|>")
    counts_all = image_token_counts(processor, batch["image_grid_thw"]).tolist() if "image_grid_thw" in batch else []
    labels = torch.full_like(batch["input_ids"], IGNORE)
    k = 0
    for b, (text, sp) in enumerate(zip(texts, spans)):
        n_img = text.count(pad)
        counts = counts_all[k:k + n_img]
        k += n_img
        starts = offsets[b, :, 0]
        ends = offsets[b, :, 1]
        keep = torch.zeros_like(starts, dtype=torch.bool)
        for s, e in sp:
            s2, e2 = _expanded_offset(text, s, pad, counts), _expanded_offset(text, e, pad, counts)
            keep |= (starts >= s2) & (ends <= e2) & (ends > starts)
        keep &= batch["attention_mask"][b].bool()
        labels[b, keep] = batch["input_ids"][b, keep]
    batch["labels"] = labels
    return batch


def encode_prompts(processor, conversations: Sequence[list[dict]], images: Sequence[list]):
    """Left-padded generation inputs for B prompt conversations (generation prompt appended)."""
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    flat_images = [im for ims in images for im in ims] or None
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    try:
        return processor(text=texts, images=flat_images, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = side

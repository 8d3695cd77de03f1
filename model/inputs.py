"""Turning chat conversations + images (and video clips) into model inputs, with loss labels on
assistant tokens only.

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


def _pads(text: str, pad: str) -> list[int]:
    """Start positions of each `pad` in `text`."""
    out, i = [], text.find(pad)
    while i >= 0:
        out.append(i)
        i = text.find(pad, i + len(pad))
    return out


def _expanded_offset(pos: int, pads: list[tuple[int, int, int]]) -> int:
    """Character position `pos` of a text after each placeholder (start, length, count) in it, in
    order, became `count` copies of itself (as the processor expands image and video pads)."""
    return pos + sum((count - 1) * length for start, length, count in pads if start < pos)


def _token_counts(batch, key: str, processor_part) -> list[int]:
    """Placeholder tokens of each video clip (grid patches / merge^2), in batch order (images go by
    their family's rule, `model.families.image_token_counts`)."""
    if key not in batch:
        return []
    merge = getattr(processor_part, "merge_size", 2)
    return (batch[key].prod(-1) // (merge * merge)).tolist()


def _flat(items: Sequence[list] | None) -> list | None:
    """The per-conversation lists as one list, or None when they hold nothing (the processor's "no input")."""
    flat = [x for row in items or () for x in row]
    return flat or None


def encode_sft(processor, conversations: Sequence[list[dict]], images: Sequence[list],
               videos: Sequence[list] | None = None):
    """Batch of SFT inputs: processor outputs + `labels` (-100 except on assistant tokens).

    conversations: B message lists (last turn usually the assistant's); images: B lists of PIL images;
    videos: B lists of video clips ((frames, H, W, 3) uint8 arrays, one per video part; see
    `records.load_media`). Returns a dict of tensors (input_ids, attention_mask, pixel_values,
    image_grid_thw, pixel_values_videos, video_grid_thw, ..., labels).
    """
    texts, spans = zip(*(_assistant_char_spans(processor, c) for c in conversations))
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "right"
    try:
        batch = processor(text=list(texts), images=_flat(images), videos=_flat(videos), return_tensors="pt",
                          padding=True, return_offsets_mapping=True)
    finally:
        processor.tokenizer.padding_side = side
    offsets = batch.pop("offset_mapping")  # (B, L, 2) in the pad-expanded text
    image_pad = getattr(processor, "image_token", "<|image_pad|>")
    video_pad = getattr(processor, "video_token", "<|video_pad|>")
    image_counts = (image_token_counts(processor, batch["image_grid_thw"]).tolist()
                    if "image_grid_thw" in batch else [])
    video_counts = _token_counts(batch, "video_grid_thw", getattr(processor, "video_processor", None))
    labels = torch.full_like(batch["input_ids"], IGNORE)
    ki = kv = 0
    for b, (text, sp) in enumerate(zip(texts, spans)):
        at_i, at_v = _pads(text, image_pad), _pads(text, video_pad)
        pads = ([(i, len(image_pad), c) for i, c in zip(at_i, image_counts[ki:ki + len(at_i)])]
                + [(i, len(video_pad), c) for i, c in zip(at_v, video_counts[kv:kv + len(at_v)])])
        ki, kv = ki + len(at_i), kv + len(at_v)
        starts = offsets[b, :, 0]
        ends = offsets[b, :, 1]
        keep = torch.zeros_like(starts, dtype=torch.bool)
        for s, e in sp:
            s2, e2 = _expanded_offset(s, pads), _expanded_offset(e, pads)
            keep |= (starts >= s2) & (ends <= e2) & (ends > starts)
        keep &= batch["attention_mask"][b].bool()
        labels[b, keep] = batch["input_ids"][b, keep]
    batch["labels"] = labels
    return batch


def encode_prompts(processor, conversations: Sequence[list[dict]], images: Sequence[list],
                   videos: Sequence[list] | None = None):
    """Left-padded generation inputs for B prompt conversations (generation prompt appended);
    images and video clips per conversation as in `encode_sft`."""
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    try:
        return processor(text=texts, images=_flat(images), videos=_flat(videos), return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = side

"""Prompt rendering shared by the engines and the trainer, and the trainer-side batch of
prompt + response token ids built from completions.

Both engines render a `Prompt` with `render_prompt` (the processor's chat template), so the prompt
tokens the trainer sees here are the ones the engine sampled from.
"""
from __future__ import annotations

from typing import Sequence

import torch

from rollout.types import Completion, Prompt


def render_prompt(processor, prompt: Prompt) -> str:
    """Chat-template text of the prompt turns with the assistant generation prompt appended (one
    image placeholder per image part; the processor / vLLM expand it to the image's tokens)."""
    return processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)


# Tokens that mark image/video slots in a Qwen2/2.5-VL prompt. A response must never contain them:
# the trainer's forward would take a sampled <|image_pad|> for an image slot (a random or drifting
# policy does sample them), so the engines ban them at sampling time.
_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def vision_token_ids(processor) -> list[int]:
    """Ids of the vision placeholder/marker tokens the tokenizer knows (banned in responses)."""
    tok = processor.tokenizer
    names = {getattr(processor, "image_token", None), getattr(processor, "video_token", None),
             getattr(tok, "vision_bos_token", None), getattr(tok, "vision_eos_token", None), *_VISION_TOKENS}
    vocab = tok.get_vocab()
    return sorted({vocab[t] for t in names if t in vocab})


def encode_prompt(processor, prompt: Prompt) -> dict[str, torch.Tensor]:
    """Processor outputs of one prompt, unpadded: input_ids (1, P), and for images pixel_values
    (patches, D), image_grid_thw (images, 3), mm_token_type_ids (1, P)."""
    n_parts = sum(1 for m in prompt.messages if not isinstance(m["content"], str)
                  for p in m["content"] if p.get("type") == "image")
    if n_parts != len(prompt.images):
        raise ValueError(f"prompt has {n_parts} image parts but {len(prompt.images)} images")
    return dict(processor(text=[render_prompt(processor, prompt)], images=list(prompt.images) or None,
                          return_tensors="pt"))


def build_sequences(processor, prompts: Sequence[Prompt], completions: Sequence[Sequence[Completion]],
                    *, pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """One row per completion (prompt-major: prompt 0's samples first), right-padded:

      input_ids      (B, L)  prompt ids + response ids, then pad
      attention_mask (B, L)  1 on prompt and response tokens
      response_mask  (B, L)  1 on response tokens
      prompt_index   (B,)    index into `prompts` of each row
      pixel_values, image_grid_thw   each row's prompt images (repeated per sample), row order
      mm_token_type_ids (B, L)        1 on image tokens (transformers' Qwen2-VL M-RoPE needs it)

    The causal-LM alignment is the caller's: logits[:, :-1] predict input_ids[:, 1:], and the
    sampled-token log-probs are token_logp(logits[:, :-1], input_ids[:, 1:]) where response_mask[:, 1:].
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion groups")
    pad = processor.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    banned = set(vision_token_ids(processor))
    rows, pixel_values, grids, prompt_index = [], [], [], []
    for i, (prompt, group) in enumerate(zip(prompts, completions)):
        enc = encode_prompt(processor, prompt)
        ids = enc["input_ids"][0]
        mtt = enc.get("mm_token_type_ids", torch.zeros_like(enc["input_ids"]))[0]
        for c in group:
            if banned.intersection(c.token_ids):
                raise ValueError(f"prompt {i}: a response contains a vision token {sorted(banned & set(c.token_ids))}; "
                                 "the trainer would read it as an image slot")
            resp = torch.tensor(c.token_ids, dtype=ids.dtype)
            rows.append((ids, resp, mtt))
            prompt_index.append(i)
            if "pixel_values" in enc:
                pixel_values.append(enc["pixel_values"])
                grids.append(enc["image_grid_thw"])
    B = len(rows)
    L = max((len(p) + len(r) for p, r, _ in rows), default=0)
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    response_mask = torch.zeros(B, L, dtype=torch.long)
    mm_token_type_ids = torch.zeros(B, L, dtype=torch.long)
    for b, (p, r, mtt) in enumerate(rows):
        P, R = len(p), len(r)
        input_ids[b, :P], input_ids[b, P:P + R] = p, r
        attention_mask[b, :P + R] = 1
        response_mask[b, P:P + R] = 1
        mm_token_type_ids[b, :P] = mtt
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
           "mm_token_type_ids": mm_token_type_ids, "prompt_index": torch.tensor(prompt_index, dtype=torch.long)}
    if pixel_values:
        out["pixel_values"] = torch.cat(pixel_values)
        out["image_grid_thw"] = torch.cat(grids)
    return out


def engine_logp(completions: Sequence[Sequence[Completion]], mask: torch.Tensor) -> torch.Tensor:
    """The engine's sampled-token log-probs laid out like the trainer's: (B, T) on the label
    positions `mask` (B, T) marks (`response_mask[:, 1:]` of `build_sequences`), 0 elsewhere.
    Rows follow `build_sequences` (prompt-major)."""
    flat = [c for group in completions for c in group]
    if len(flat) != mask.shape[0]:
        raise ValueError(f"{len(flat)} completions for {mask.shape[0]} rows")
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for b, c in enumerate(flat):
        pos = mask[b].nonzero().flatten()
        if len(c.logp) != len(pos):
            raise ValueError(f"row {b}: the engine returned {len(c.logp)} log-probs for {len(pos)} response tokens")
        out[b, pos] = torch.tensor(c.logp, dtype=torch.float32)
    return out

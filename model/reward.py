"""The scalar reward model: the critic's VLM backbone + linear head (`model.critic.ValueModel`), its
per-position values pooled to one score per (prompt, response); and how RM inputs are built.

On disk an RM is a critic folder (backbone in HF layout + `value_head.safetensors`) plus the processor
and `reward_model.json` ({"pooling": ...}). A policy folder is a valid starting point (fresh head).
The RM sees the prompt and the solution only: a think block is stripped before scoring, in training
and in use alike, so that it judges what the hybrid reward hands it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from model.critic import ValueModel
from model.inputs import IGNORE, encode_sft
from verifiers.think_format import split_think

REWARD_CONFIG_FILE = "reward_model.json"
Pooling = Literal["last", "mean"]


class RewardModel(nn.Module):
    """r(prompt, response): ValueModel values (B, L) pooled (`pool_values`) to (B,)."""

    def __init__(self, critic: ValueModel, *, pooling: Pooling = "last"):
        super().__init__()
        self.critic = critic
        self.pooling = pooling

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, pooling: Pooling | None = None,
                        dtype: torch.dtype | None = None) -> RewardModel:
        """Load an RM folder, or start one from a policy/critic folder (pooling then defaults to 'last')."""
        path = Path(path)
        saved = json.loads((path / REWARD_CONFIG_FILE).read_text()) if (path / REWARD_CONFIG_FILE).is_file() else {}
        if pooling is not None and saved.get("pooling", pooling) != pooling:
            raise ValueError(f"{path} was trained with pooling={saved['pooling']!r}, not {pooling!r}")
        return cls(ValueModel.from_pretrained(path, dtype=dtype), pooling=pooling or saved.get("pooling", "last"))

    def save_pretrained(self, path: str | os.PathLike, *, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the RM folder; the weights from `state_dict` (this model's names) where given."""
        critic_sd = None if state_dict is None else {k.removeprefix("critic."): v for k, v in state_dict.items()}
        path = self.critic.save_pretrained(path, state_dict=critic_sd)
        (path / REWARD_CONFIG_FILE).write_text(json.dumps({"pooling": self.pooling}, indent=1))
        return path

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *, response_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None,
                pixel_values_videos: Tensor | None = None, video_grid_thw: Tensor | None = None,
                mm_token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids, attention_mask, response_mask: (B, L) -> rewards (B,) float32."""
        values = self.critic(input_ids, attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                             pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                             mm_token_type_ids=mm_token_type_ids)  # (B, L)
        return pool_values(values, attention_mask, pooling=self.pooling, response_mask=response_mask)


def last_index(attention_mask: Tensor) -> Tensor:
    """Index of the last attended position of each row: (B, L) -> (B,). Works for left or right padding."""
    pos = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), pos, -1).amax(-1)


def pool_values(values: Tensor, attention_mask: Tensor, *, pooling: Pooling,
                response_mask: Tensor | None = None) -> Tensor:
    """One score per sequence from per-position values (B, L) -> (B,).

    last: the value at the last non-padding position (the end of the response; the usual RM read-out).
    mean: the mean value over `response_mask` (B, L) positions (the response tokens), so a mistake
          anywhere in the response moves the score directly.
    """
    if pooling == "last":
        return values.gather(-1, last_index(attention_mask)[:, None]).squeeze(-1)
    if pooling == "mean":
        if response_mask is None:
            raise ValueError("pooling='mean' needs the response_mask")
        keep = (response_mask * attention_mask).bool()   # masked entries may hold garbage: select, never multiply
        total = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)
        return total / keep.to(values.dtype).sum(-1).clamp(min=1)
    raise ValueError(f"unknown pooling {pooling!r}")


def prompt_messages(prompt: str | Sequence[dict], n_images: int) -> list[dict]:
    """A prompt as chat messages: a string becomes one user turn, its images first (as the suite's are)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]
    return list(prompt)


def rm_conversation(prompt: str | Sequence[dict], solution: str, n_images: int) -> list[dict]:
    """The conversation the RM scores: the prompt, then the solution as the assistant's turn."""
    return prompt_messages(prompt, n_images) + [{"role": "assistant", "content": [{"type": "text", "text": solution}]}]


def solution_only(response: str) -> str:
    """The solution of a `<think>..</think>solution` response (the whole text when it has no think block)."""
    split = split_think(response)
    return response.strip() if split is None else split[1]


def encode_rm(processor, conversations: Sequence[list[dict]], images: Sequence[list],
              videos: Sequence[list] | None = None) -> dict[str, Any]:
    """Model inputs of B RM conversations (right-padded), with `response_mask` (B, L) on the assistant
    tokens; images and video clips per conversation as in `model.inputs.encode_sft`."""
    batch = encode_sft(processor, conversations, images, videos)
    batch["response_mask"] = (batch.pop("labels") != IGNORE).long()
    return batch


def split_media(media: Sequence[Any], base: Path | None = None) -> tuple[list, list]:
    """(images, video clips) of an RM item's media: a video clip is a (frames, H, W, 3) array (as
    `records.load_media` makes them), anything else an image for `as_images`."""
    clips = [m for m in media if isinstance(m, np.ndarray) and m.ndim == 4]
    return as_images([m for m in media if not (isinstance(m, np.ndarray) and m.ndim == 4)], base), clips


def as_images(images: Sequence[Any], base: Path | None = None) -> list:
    """PIL RGB images from PIL images or paths (relative paths against `base`)."""
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
        else:
            p = Path(im)
            with Image.open(base / p if base is not None and not p.is_absolute() else p) as f:
                out.append(f.convert("RGB"))
    return out

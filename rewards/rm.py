"""The trained reward model as the hybrid reward's `rm=` callable: (images, prompt, solution) -> a score
on the verifiers' [0, 1] scale.

Mapping of the raw Bradley-Terry score r to [0, 1] (`mapping`):
  sigmoid   sigmoid((r - offset) / temperature)   (default: offset 0, temperature 1). Under the BT model
            sigmoid(r_x - r_y) is P(x preferred to y), so sigmoid(r) reads as P(preferred to an answer
            of reward `offset`); training with `center_coef` > 0 keeps rewards centred on 0.
  raw       r itself (for analysis or a driver that normalises rewards on its own).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from model.load import load_processor
from model.reward import RewardModel, encode_rm, rm_conversation, split_media

ScoreMapping = Literal["sigmoid", "raw"]
# One item of the hybrid reward's RM call: (images, prompt text or messages, solution)
Item = tuple[Sequence[Any], Any, str]


def to_unit(r: float, *, mapping: ScoreMapping = "sigmoid", offset: float = 0.0, temperature: float = 1.0) -> float:
    """A raw RM score on the [0, 1] scale (see the module docstring)."""
    if mapping == "raw":
        return r
    z = (r - offset) / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


class RewardModelScorer:
    """Loads an RM folder once and scores batches. Usable as `rewards.hybrid.score_batch(..., rm=scorer)`.

    Images may be PIL images or paths (relative paths resolve against `image_root`), video clips
    (frames, H, W, 3) arrays. A prompt is the user text (one user turn, the images first) or a list of
    chat messages (a video record's: `records.load_media`, its video parts expanded into clips). The solution is scored as
    given: pass it without the think block (the hybrid reward already does).
    """

    def __init__(self, path: str | os.PathLike, *, batch_size: int = 16, mapping: ScoreMapping = "sigmoid",
                 offset: float = 0.0, temperature: float = 1.0, device: str = "cpu",
                 dtype: str = "float32", image_root: str | os.PathLike | None = None):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.path = Path(path)
        self.rm = RewardModel.from_pretrained(self.path, dtype=getattr(torch, dtype)).to(device).eval()
        self.processor = load_processor(self.path)
        self.batch_size, self.mapping, self.offset, self.temperature = batch_size, mapping, offset, temperature
        self.device = device
        self.image_root = None if image_root is None else Path(image_root)

    @torch.no_grad()
    def raw(self, items: Sequence[Item]) -> list[float]:
        """Raw BT scores, one per item."""
        scores: list[float] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            media = [split_media(ims, self.image_root) for ims, _, _ in chunk]
            convs = [rm_conversation(prompt, sol, len(ims)) for (_, prompt, sol), (ims, _) in zip(chunk, media)]
            batch = encode_rm(self.processor, convs, [ims for ims, _ in media], [clips for _, clips in media])
            inputs = {k: v.to(self.device) for k, v in batch.items() if k in (
                "input_ids", "attention_mask", "response_mask", "pixel_values", "image_grid_thw",
                "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")}
            scores += self.rm(**inputs).tolist()
        return scores

    def __call__(self, items: Sequence[Item]) -> list[float]:
        return [to_unit(r, mapping=self.mapping, offset=self.offset, temperature=self.temperature)
                for r in self.raw(items)]

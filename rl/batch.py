"""The trainer-side rollout batch: token tensors of prompt + response rows and their vision inputs,
and slicing rows into micro-batches (each row's image patches travel with it).

Token-level tensors of the RL math are on *label positions*: T = L - 1, position t scores
input_ids[:, t + 1] (causal-LM alignment), so `mask = response_mask[:, 1:]`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Keys that are model inputs (everything else in a batch dict is bookkeeping or RL tensors).
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def row_patch_ranges(mm_token_type_ids: Tensor, image_grid_thw: Tensor, merge: int = 2) -> list[tuple[int, int, int, int]]:
    """Per row: (first image, end image, first patch, end patch) into image_grid_thw / pixel_values.

    A row owns the images whose merged tokens fill its image slots: row b has
    sum(mm_token_type_ids[b] == 1) image tokens = sum over its images of t*h*w / merge^2.
    """
    tokens_per_image = (image_grid_thw.prod(-1) // (merge * merge)).tolist()
    patches_per_image = image_grid_thw.prod(-1).tolist()
    out, img, patch = [], 0, 0
    for b in range(mm_token_type_ids.shape[0]):
        need = int((mm_token_type_ids[b] == 1).sum())
        first_img, first_patch = img, patch
        while need > 0:
            need -= tokens_per_image[img]
            patch += patches_per_image[img]
            img += 1
        if need != 0:
            raise ValueError(f"row {b}: image tokens do not match image_grid_thw")
        out.append((first_img, img, first_patch, patch))
    return out


def select_rows(batch: dict, idx: Sequence[int], *, merge: int = 2) -> dict:
    """A sub-batch of rows `idx` (vision patches included), trimmed to its longest row."""
    idx_t = torch.as_tensor(list(idx), dtype=torch.long)
    out = {}
    width = int(batch["attention_mask"][idx_t].sum(-1).max())
    for k, v in batch.items():
        if k in ("pixel_values", "image_grid_thw", "_patch_ranges"):
            continue
        if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch["input_ids"].shape[0]:
            v = v[idx_t]
            if v.dim() >= 2 and v.shape[1] == batch["input_ids"].shape[1]:
                v = v[:, :width]
            elif v.dim() >= 2 and v.shape[1] == batch["input_ids"].shape[1] - 1:  # label positions
                v = v[:, :width - 1]
            out[k] = v
        elif isinstance(v, list) and len(v) == batch["input_ids"].shape[0]:
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    if "pixel_values" in batch:
        ranges = batch.get("_patch_ranges") or row_patch_ranges(batch["mm_token_type_ids"], batch["image_grid_thw"], merge)
        out["pixel_values"] = torch.cat([batch["pixel_values"][ranges[i][2]:ranges[i][3]] for i in idx])
        out["image_grid_thw"] = torch.cat([batch["image_grid_thw"][ranges[i][0]:ranges[i][1]] for i in idx])
    return out


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def micro_batches(batch: dict, size: int, *, order: Sequence[int] | None = None):
    """Yield sub-batches of at most `size` rows, in `order` (default: row order)."""
    n = batch["input_ids"].shape[0]
    order = list(range(n)) if order is None else list(order)
    if "pixel_values" in batch and "_patch_ranges" not in batch:
        batch = {**batch, "_patch_ranges": row_patch_ranges(batch["mm_token_type_ids"], batch["image_grid_thw"])}
    for i in range(0, len(order), size):
        yield select_rows(batch, order[i:i + size])

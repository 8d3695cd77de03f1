"""Sequence packing for the trainer's forward: the rows of a padded micro-batch as one row without
padding, each sequence attending to itself only and rotated by the M-RoPE positions it has unpacked.

transformers (5.19, Qwen2-VL / 2.5-VL / 3-VL) takes packed rows through `position_ids` of shape
(4, 1, N): row 0 the text positions, restarting at 0 where a sequence starts, rows 1-3 the (t, h, w)
M-RoPE positions. With no `attention_mask`, its mask builders read the sequence boundaries from
row 0 (sdpa and eager get a block-diagonal causal mask) and flash attention runs varlen over the
same boundaries. The vision tower is unaffected: it takes each image and clip on its own.

A forward over the packed row computes sum(lengths) tokens instead of rows x the longest; with
sdpa or eager the attention is one N x N product masked to its diagonal blocks, so the gain is
where flash attention's varlen kernel skips the off-diagonal blocks (see docs/results.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.inputs import IGNORE


@dataclass(frozen=True)
class Packing:
    """Where the tokens of a padded (B, L) batch sit in its packed (1, N) row: row by row, padding
    dropped (N = the batch's real tokens)."""

    valid: Tensor   # (B, L) bool: the real tokens (each row's contiguous; right padding in vlrl)

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, ...) -> (1, N, ...), the real tokens only."""
        return x[self.valid][None]

    def unpack(self, x: Tensor) -> Tensor:
        """(1, N, ...) -> (B, L, ...), 0 on padding; differentiable."""
        out = x.new_zeros((*self.valid.shape, *x.shape[2:]))
        out[self.valid] = x[0]
        return out

    def positions(self) -> Tensor:
        """(1, N) text positions: 0, 1, ... from each sequence's first token."""
        return self.pack(self.valid.long().cumsum(-1) - 1)

    def next_tokens(self, ids: Tensor, *, fill: int = IGNORE) -> Tensor:
        """The label of each packed position, (1, N) -> (1, N): the next token of the same sequence,
        `fill` after each sequence's last token (the next one belongs to another sequence)."""
        out = torch.cat([ids[:, 1:], ids.new_full((1, 1), fill)], dim=1)
        last = self.valid.sum(-1).cumsum(0) - 1           # (B,) packed index of each row's last token
        out[0, last[self.valid.any(-1)]] = fill
        return out


# What a family's get_rope_index reads besides ids, types and mask (Qwen2.5-VL: a video's seconds per grid step)
_ROPE_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")


def _rope_owner(model: nn.Module) -> nn.Module:
    """The first module of `model` holding the family's `get_rope_index` (the ...Model inside a
    ...ForConditionalGeneration, a critic's backbone)."""
    owner = next((m for m in model.modules() if hasattr(m, "get_rope_index")), None)
    if owner is None:
        raise TypeError(f"{type(model).__name__} has no get_rope_index: packing needs a Qwen2/2.5/3-VL model")
    return owner


def rope_positions(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """(3, B, L) M-RoPE positions of a padded batch, as the model computes them in its own forward:
    its `get_rope_index` where there are images or clips, text positions (0, 1, ...) on all three
    axes otherwise. `inputs`: the forward's keyword arguments (input_ids, attention_mask,
    mm_token_type_ids, image_grid_thw / video_grid_thw where present)."""
    mask = inputs["attention_mask"]
    if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
        text = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return text[None].expand(3, -1, -1)
    extra = {k: inputs[k] for k in _ROPE_KEYS if inputs.get(k) is not None}
    positions, _ = _rope_owner(model).get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], attention_mask=mask, **extra)
    return positions


def pack_inputs(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Packing]:
    """The forward's keyword arguments of a padded batch as one packed row, and where its tokens
    went. input_ids and mm_token_type_ids become (1, N), `position_ids` (4, 1, N) (text, t, h, w),
    attention_mask is dropped (so the model masks by sequence); the vision inputs stay as they are
    (their order, rows in order, is the packed row's). Run the forward with use_cache=False:
    transformers reads sequence boundaries from the positions only when there is no KV cache."""
    packing = Packing(inputs["attention_mask"].bool())
    rope = rope_positions(model, inputs)                        # (3, B, L)
    position_ids = torch.cat([packing.positions()[None], rope[:, packing.valid][:, None]])   # (4, 1, N)
    out = {k: v for k, v in inputs.items() if k not in ("attention_mask", "input_ids", "mm_token_type_ids")}
    out.update(input_ids=packing.pack(inputs["input_ids"]), position_ids=position_ids)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = packing.pack(inputs["mm_token_type_ids"])
    return out, packing


def forward_inputs(model: nn.Module, inputs: dict[str, Tensor], *, pack: bool) -> tuple[dict[str, Tensor],
                                                                                      Packing | None]:
    """The forward's keyword arguments: `inputs` as they are (pack False; no Packing) or packed
    (`pack_inputs`). Outputs of a packed forward go back to (B, L) through `Packing.unpack`."""
    return pack_inputs(model, inputs) if pack else (inputs, None)

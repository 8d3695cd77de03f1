"""The shared critic: one VLM backbone with a scalar value head, used for every task type.

On disk a critic is an HF folder: the backbone's `save_pretrained` output plus `value_head.safetensors`.
A policy folder (no value head) is a valid starting point: the backbone loads from it (its LM head
is left out) and the value head starts near zero.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """V(s) at every position: backbone last hidden states -> nn.Linear(hidden, 1).

    `values[:, p]` estimates the return of what follows position p, i.e. V of the state in which
    token p + 1 is generated. So the value of response token t (the label at position p) is
    `values[:, p - 1]`: align like logits, `values[:, :-1]` against `input_ids[:, 1:]`.
    """

    def __init__(self, backbone: nn.Module, value_head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        if value_head is None:
            # Near-zero start (std 1/(hidden+1), zero bias): initial values ~ 0, so value pretraining
            # starts from a neutral baseline rather than from random offsets.
            value_head = nn.Linear(hidden, 1, dtype=torch.float32)
            nn.init.normal_(value_head.weight, std=1.0 / (hidden + 1))
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> ValueModel:
        """Load a critic folder, or start a critic from a policy folder (then the head is fresh)."""
        path = Path(path)
        backbone = AutoModel.from_pretrained(path, dtype=dtype)
        critic = cls(backbone)
        head_file = path / VALUE_HEAD_FILE
        if head_file.exists():
            critic.value_head.load_state_dict(load_file(head_file))
        return critic

    def save_pretrained(self, path: str | os.PathLike, *, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the backbone in HF layout and the head as `value_head.safetensors` next to it; from
        `state_dict` (this model's names, e.g. gathered from shards) where given."""
        path = Path(path)
        if state_dict is None:
            self.backbone.save_pretrained(path)
            head = self.value_head.state_dict()
        else:
            self.backbone.save_pretrained(path, state_dict={k.removeprefix("backbone."): v for k, v in state_dict.items()
                                                            if k.startswith("backbone.")})
            head = {k.removeprefix("value_head."): v for k, v in state_dict.items() if k.startswith("value_head.")}
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, path / VALUE_HEAD_FILE)
        return path

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None,
                pixel_values_videos: Tensor | None = None, video_grid_thw: Tensor | None = None,
                mm_token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        """input_ids, attention_mask: (B, L); image and video inputs as the processor returns them
        (transformers needs `mm_token_type_ids` with them for M-RoPE). Returns values (B, L) float32.
        """
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                            video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids,
                            position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state  # (B, L, H)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

"""The shared critic: one VLM backbone with a scalar value head, used for every task type, and
value pretraining (fit the critic to the frozen SFT policy's returns before any actor update).

On disk a critic is an HF folder: the backbone's `save_pretrained` output plus `value_head.safetensors`.
A policy folder (no value head) is a valid starting point: the backbone loads from it (its LM head
is left out) and the value head starts near zero.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rl.algos import Agg, value_loss

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
        from transformers import AutoModel

        path = Path(path)
        backbone = AutoModel.from_pretrained(path, dtype=dtype)
        critic = cls(backbone)
        head_file = path / VALUE_HEAD_FILE
        if head_file.exists():
            critic.value_head.load_state_dict(load_file(head_file))
        return critic

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the backbone in HF layout and the head as `value_head.safetensors` next to it."""
        path = Path(path)
        self.backbone.save_pretrained(path)
        head = {k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
        save_file(head, path / VALUE_HEAD_FILE)
        return path

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None,
                mm_token_type_ids: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        """input_ids, attention_mask: (B, L); vision inputs as the processor returns them
        (transformers needs `mm_token_type_ids` with images for M-RoPE). Returns values (B, L) float32.
        """
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
                            position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state  # (B, L, H)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()


@dataclass
class ValueBatch:
    """One ready batch for value pretraining. Any object with these attributes will do."""

    input_ids: Tensor  # (B, L) prompt + response tokens
    attention_mask: Tensor  # (B, L)
    returns: Tensor  # (B, L) critic targets aligned with ValueModel's output (see its docstring)
    mask: Tensor  # (B, L) 1 where a target exists (the states before response tokens)
    pixel_values: Tensor | None = None  # as the processor returns them
    image_grid_thw: Tensor | None = None  # (n_images, 3)
    mm_token_type_ids: Tensor | None = None  # (B, L)


def pretrain_value(critic: ValueModel, optimizer: torch.optim.Optimizer,
                   batches: Iterable[ValueBatch] | Callable[[], ValueBatch], *, steps: int,
                   agg: Agg = "token_mean", max_grad_norm: float | None = 1.0) -> list[dict[str, float]]:
    """Value pretraining (VC-PPO 2503.01491; VAPO 2504.05118 "Value-Pretraining"): `steps` optimizer
    steps of the unclipped value loss 1/2 (V - R)^2 on returns of the frozen SFT policy's rollouts
    (computed by the caller with lam_critic = 1.0, i.e. `decoupled_gae(...)[1]`), before any actor update.

    `batches` is an iterable (stops early when exhausted) or a callable returning the next batch
    (the driver's rollout source). Returns one dict of floats per step: loss, explained_variance,
    grad_norm.
    """
    next_batch = batches if callable(batches) else iter(batches).__next__
    device = next(critic.parameters()).device
    critic.train()
    history = []
    for _ in range(steps):
        try:
            batch = next_batch()
        except StopIteration:
            break
        to = lambda x: None if x is None else x.to(device)  # noqa: E731
        values = critic(to(batch.input_ids), to(batch.attention_mask), pixel_values=to(getattr(batch, "pixel_values", None)),
                        image_grid_thw=to(getattr(batch, "image_grid_thw", None)),
                        mm_token_type_ids=to(getattr(batch, "mm_token_type_ids", None)))
        loss, metrics = value_loss(values, values.detach(), to(batch.returns), to(batch.mask), clip=None, agg=agg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), max_grad_norm)
        else:
            grad_norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in critic.parameters() if p.grad is not None))
        optimizer.step()
        history.append({"loss": loss.item(), "explained_variance": metrics["explained_variance"].item(),
                        "grad_norm": float(grad_norm)})
    return history

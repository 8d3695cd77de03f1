"""Weight sync in buckets: the trainer's parameters, a few at a time, grouped so that every layer
arrives whole (vLLM fuses q, k and v, and gate and up, of a layer into one tensor: a layer reloaded
in parts loses the parts that were not sent)."""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

# `...layers.3.self_attn.q_proj.weight` belongs to `...layers.3`, `...blocks.1.attn.qkv.weight` to `...blocks.1`
_LAYER = re.compile(r"^(.*?\.(?:layers|blocks|h|layer)\.\d+)\.")


def layer_key(name: str) -> str:
    """The layer a parameter belongs to: the numbered block it sits in, else its parent module."""
    m = _LAYER.match(name)
    return m.group(1) if m else name.rpartition(".")[0]


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive (name, tensor) pairs in buckets of about `max_bytes`: a bucket closes only between
    two layers, so a layer is never split (one larger than `max_bytes` makes a bucket of its own)."""
    bucket: dict[str, torch.Tensor] = {}
    size, last = 0, None
    for name, t in named:
        key = layer_key(name)
        if bucket and key != last and size >= max_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t
        size += t.numel() * t.element_size()
        last = key
    if bucket:
        yield bucket

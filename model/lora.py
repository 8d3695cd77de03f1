"""LoRA adapters (PEFT) on a VLM's linear layers: which layers take them, switching them off (the
frozen base is then the reference policy: no second copy in memory), the merged weights under the
base model's names (weight sync, HF export) and the adapter folder PEFT loads.

Adapters are injected in place (`peft.inject_adapter_in_model`): the model keeps its class and its
parameter names, an adapted layer `X` holding `X.base_layer.weight` (frozen) and
`X.lora_A.default.weight`, `X.lora_B.default.weight` (trained). B starts at zero, so a fresh
adapter leaves the model's output unchanged. Every function here also works on a model sharded with
FSDP2 (then every rank must call it: full tensors are gathered one at a time).
"""
from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from safetensors.torch import save_file
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from training.config import ConfigError

ADAPTER = "default"                        # PEFT's adapter name; one adapter per model
ADAPTER_DIR = "adapter"                    # the adapter folder inside an exported HF folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."         # PEFT's on-disk names start here (a PeftModel's own prefix)
LANGUAGE_MODEL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA on a frozen base: W x + (alpha / r) B A dropout(x) on every target layer."""

    r: int = 16                            # rank of each adapter
    alpha: float = 32.0                    # the update is scaled by alpha / r
    dropout: float = 0.0                   # dropout on the adapter's input while training
    target_modules: tuple[str, ...] = LANGUAGE_MODEL_LINEARS
    """Linear layers that take adapters. A plain name (`q_proj`) matches the layers of that name in
    the language model only (the vision tower stays frozen); a dotted name matches the end of a
    module's full name anywhere, e.g. `attn.qkv` or `visual.merger.mlp.0` (Qwen2-VL's vision tower)."""

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"r: must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("target_modules: empty (name at least one linear layer, e.g. q_proj)")
        bad = [t for t in self.target_modules if not re.fullmatch(r"[\w.]+", t) or t.startswith(".") or t.endswith(".")]
        if bad:
            raise ConfigError(f"target_modules: {bad[0]!r} is not a module name (letters, digits, _ and dots)")


def target_pattern(names: tuple[str, ...]) -> str:
    """The regex (matched against whole module names) of `LoRAConfig.target_modules`: plain names
    inside a `language_model`, dotted names as a suffix anywhere."""
    plain = [re.escape(n) for n in names if "." not in n]
    dotted = [re.escape(n) for n in names if "." in n]
    parts = []
    if plain:
        parts.append(rf"(?:.*\.)?language_model\..*\.(?:{'|'.join(plain)})")
    if dotted:
        parts.append(rf"(?:.*\.)?(?:{'|'.join(dotted)})")
    return "|".join(parts)


def add_adapters(model: nn.Module, cfg: LoRAConfig, *, key: str = "lora") -> list[str]:
    """Inject LoRA adapters into `model` in place (its other parameters frozen); the names of the
    adapted layers. ConfigError naming `key` when the targets match no linear layer."""
    from peft import LoraConfig, inject_adapter_in_model  # heavy optional import (seconds): only LoRA runs need it

    pattern = target_pattern(cfg.target_modules)
    hits = [n for n, m in model.named_modules() if re.fullmatch(pattern, n)]
    wrong = [n for n in hits if not isinstance(model.get_submodule(n), nn.Linear)]
    if not hits or wrong:
        linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear) and "language_model." in n})
        what = f"{wrong[0]}, which is not a linear layer" if wrong else "no layer of the model"
        raise ConfigError(f"{key}.target_modules: {list(cfg.target_modules)} match {what} (the language model's "
                          f"linear layers: {', '.join(linears)}; a dotted name reaches others, e.g. attn.qkv)")
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern, bias="none")
    inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    return hits


def has_adapters(model: nn.Module) -> bool:
    """Whether LoRA adapters were injected anywhere in `model` (PEFT leaves `peft_config` there)."""
    return any(getattr(m, "peft_config", None) for m in model.modules())


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    if not has_adapters(model):
        return {}
    from peft.tuners.lora import LoraLayer  # heavy optional import: only models with adapters get here

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@contextmanager
def adapters_off(model: nn.Module):
    """Run `model` as its frozen base: every adapter switched off inside the block (PEFT's switch;
    an adapted layer then computes exactly its base layer)."""
    layers = list(_lora_layers(model).values())
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def _full(t: Tensor) -> Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def _owner(name: str, layers: dict[str, nn.Module]) -> str | None:
    """The adapted layer a state-dict entry belongs to (the longest prefix of `name` in `layers`)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix
    return None


def _plain_entries(model: nn.Module, state: dict) -> Iterator[tuple[str, str, str | None]]:
    """(name in the plain model, state-dict key, adapted layer or None) of each entry `full_params`
    yields: an adapted layer's base tensors under the base layer's names, its adapters left out."""
    layers = _lora_layers(model)
    for name in state:
        owner = _owner(name, layers) if layers else None
        if owner is None:
            yield name, name, None
            continue
        rest = name[len(owner) + 1:]
        if rest.startswith("base_layer."):             # lora_A / lora_B: folded into the weight
            yield f"{owner}.{rest.removeprefix('base_layer.')}", name, owner


def full_params(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor) of every entry of the model's state dict, one at a time, as the plain
    model would have them: with adapters, each adapted layer's weight merged (W + (alpha / r) B A,
    in the weight's dtype) under the base layer's name, the adapters themselves left out. Sharded
    tensors are gathered when their turn comes; every rank must run the iterator to its end."""
    state = model.state_dict()
    layers = _lora_layers(model)
    for name, key, owner in _plain_entries(model, state):
        full = _full(state[key])
        if owner is not None and name == f"{owner}.weight":
            layer = layers[owner]
            a = _full(state[f"{owner}.lora_A.{ADAPTER}.weight"]).float()   # (r, in)
            b = _full(state[f"{owner}.lora_B.{ADAPTER}.weight"]).float()   # (out, r)
            delta = (b @ a) * layer.scaling[ADAPTER]                       # (out, in)
            full = (full.float() + (delta.T if layer.fan_in_fan_out else delta)).to(full.dtype)
        yield name, full


def full_param_meta(model: nn.Module) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, full shape) of each tensor `full_params` yields, in its order, without
    gathering anything (a sharded tensor knows its global shape)."""
    state = model.state_dict()
    return [(name, state[key].dtype, tuple(state[key].shape)) for name, key, _ in _plain_entries(model, state)]


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' full tensors (state-dict names) on the CPU; every rank must call it."""
    layers = _lora_layers(model)
    return {name: _full(t).to("cpu", copy=True) for name, t in model.state_dict().items()
            if (owner := _owner(name, layers)) is not None and not name[len(owner) + 1:].startswith("base_layer.")}


def write_adapter(model: nn.Module, folder: str | Path, *, state: dict[str, Tensor], base: str) -> Path:
    """Write the adapter folder PEFT loads (`PeftModel.from_pretrained(base_model, folder)`, or
    transformers' `model.load_adapter(folder)`): adapter_config.json and adapter_model.safetensors,
    from `state` (`adapter_state`, names relative to `model`). `base`: the base model's folder."""
    from peft.utils import get_peft_model_state_dict  # heavy optional import: only LoRA runs get here

    holder = next(m for m in model.modules() if getattr(m, "peft_config", None))
    prefix = next(n for n, m in model.named_modules() if m is holder)
    local = {k.removeprefix(f"{prefix}.") if prefix else k: v for k, v in state.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = copy.copy(holder.peft_config[ADAPTER])
    cfg.base_model_name_or_path = str(base)
    cfg.save_pretrained(str(folder))
    weights = get_peft_model_state_dict(holder, state_dict=local, adapter_name=ADAPTER)
    save_file({_PEFT_PREFIX + k: v.contiguous() for k, v in weights.items()}, str(folder / ADAPTER_WEIGHTS))
    return folder


def merged_state_dict(model: nn.Module, *, keep: bool = True) -> dict[str, Tensor]:
    """`full_params` collected on the CPU (`keep=False`: run the gathers, keep nothing: the other
    ranks of a group)."""
    return {k: v.to("cpu", copy=True) for k, v in full_params(model) if keep}


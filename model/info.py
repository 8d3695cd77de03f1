"""What a model folder holds, for `vlrl model info DIR`: the family, parameter counts of the vision
tower, the merger and the LLM, the image token budget, the coordinate convention and the chat
template in use. Parameters are counted from the safetensors headers, so no weight is loaded."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from model.families import FAMILIES, family_of_processor, resize_settings
from model.load import load_processor

MEANING = {"norm1000": "0-1000 of the image's width and height",
           "resized": "pixels of the image as the processor resized it", "pixel": "pixels of the image"}
EXAMPLE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are there?"}]}]


@dataclass
class ModelInfo:
    path: str
    model_type: str
    family: str | None                       # registry key, None when vlrl does not know the family
    params: dict[str, int] = field(default_factory=dict)   # vision, merger, llm, value_head (when present)
    patch_factor: int = 0                    # pixels per side of one image token (patch x merge)
    min_pixels: int = 0
    max_pixels: int = 0
    coords: str = ""                         # the family's grounding coordinates
    template: str = ""                       # where the chat template comes from
    example: str = ""                        # EXAMPLE rendered with the generation prompt

    @property
    def image_tokens(self) -> tuple[int, int]:
        """(fewest, most) LLM tokens one image takes after the processor's resize."""
        area = self.patch_factor ** 2
        return math.ceil(self.min_pixels / area), self.max_pixels // area


def count_params(path: Path, merger_prefixes: tuple[str, ...]) -> dict[str, int]:
    """Parameters per part from the safetensors files of `path`: `vision` (the vision tower without
    the merger), `merger`, `llm` (decoder, embeddings, LM head) and `value_head` (critic/RM folders)."""
    counts = {"vision": 0, "merger": 0, "llm": 0}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                n = math.prod(f.get_slice(name).get_shape())
                if file.name == "value_head.safetensors":
                    part = "value_head"
                elif any(p in name for p in merger_prefixes):
                    part = "merger"
                elif "visual." in name:
                    part = "vision"
                else:
                    part = "llm"
                counts[part] = counts.get(part, 0) + n
    return counts


def describe(path: str | os.PathLike) -> ModelInfo:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "?")
    family = FAMILIES.get(model_type)
    info = ModelInfo(str(path), model_type, family.name if family else None)
    info.params = count_params(path, family.merger_prefixes if family else ("visual.merger.",))
    processor = load_processor(path)
    r = resize_settings(processor)
    info.patch_factor, info.min_pixels, info.max_pixels = r.factor, r.min_pixels, r.max_pixels
    info.coords = family.coords if family else "unknown"
    template = processor.chat_template or ""
    known = next((f.name for f in FAMILIES.values() if f.chat_template == template), None)
    info.template = f"vlrl's {known} template" if known else f"the folder's own ({len(template)} characters)"
    if family_of_processor(processor) is not family:
        info.template += f"; processor class {type(processor).__name__}"
    info.example = processor.apply_chat_template(EXAMPLE, tokenize=False, add_generation_prompt=True)
    return info


def format_info(info: ModelInfo) -> str:
    fam = FAMILIES.get(info.family or "")
    total = sum(info.params.values())
    lo, hi = info.image_tokens
    lines = [
        f"folder          {info.path}",
        f"family          {fam.title + ' (' + fam.name + ')' if fam else 'not one vlrl knows'}"
        f"  [model_type {info.model_type}]",
        "parameters      " + ", ".join(f"{k} {v:,}" for k, v in info.params.items()) + f"  (total {total:,})",
        f"image tokens    {lo}-{hi} per image: {info.min_pixels:,}-{info.max_pixels:,} pixels after the resize, "
        f"one token per {info.patch_factor}x{info.patch_factor} pixels",
        f"coordinates     {info.coords}: grounding answers in {MEANING.get(info.coords, 'an unknown convention')}",
        f"chat template   {info.template}; a user turn with one image renders as:",
    ]
    lines += ["    " + line for line in info.example.splitlines()]
    return "\n".join(lines)

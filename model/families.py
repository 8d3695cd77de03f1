"""The model families vlrl runs, one adapter each: what differs between Qwen2-VL, Qwen2.5-VL and
Qwen3-VL lives here and nowhere else.

An adapter holds the family's transformers classes, the tiny factory's sizes for it, its chat
template, how image tokens map to vision patches, the coordinates its grounding answers are written
in, and which parameters form its vision tower and merger. The rest of vlrl asks the adapter
(`family_of(folder)`, `family_of_processor(processor)`) instead of testing a family's name.

What is the same for the three in transformers 5.19 and vLLM 0.32, and so needs no adapter field:
the vision placeholder tokens (<|vision_start|><|image_pad|><|vision_end|>), `mm_token_type_ids`
(1 on image tokens; every family's forward derives its M-RoPE position ids from it) and the
parameter prefixes `model.visual` / `model.language_model` / `lm_head`.

Coordinate conventions, as each family's publisher documents them:
  qwen2_vl    0-1000 of the image's width and height, boxes written <|box_start|>(x1,y1),(x2,y2)<|box_end|>
              (Qwen2-VL paper, arXiv 2409.12191, on visual grounding)
  qwen2_5_vl  absolute pixels of the image as the processor resized it, i.e. of the model's input, not of
              the original file (Qwen2.5-VL technical report, arXiv 2502.13923)
  qwen3_vl    0-1000 relative coordinates again. The Qwen3-VL grounding cookbook
              (github.com/QwenLM/Qwen3-VL, cookbooks/2d_grounding.ipynb) states: "Qwen3-VL's default
              coordinate system has been changed from the absolute coordinates used in Qwen2.5-VL to
              relative coordinates ranging from 0 to 1000."
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import Tensor
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                          Qwen2VLVideoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                          Qwen3VLVideoProcessor)

from verifiers.coords import Convention


# The template loop over one message's content: text, images and videos, numbered 'Picture k: ' /
# 'Video k: ' when the caller passes add_vision_id=True (the Qwen families' option).
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}")
_COUNTERS = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
_GENERATION = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"

# Qwen2-VL's layout without its default system prompt: the tiny default keeps its sequences short.
QWEN2_VL_TEMPLATE = (
    _COUNTERS + "{% for message in messages %}<|im_start|>{{ message['role'] }}\n" + _CONTENT
    + "<|im_end|>\n{% endfor %}" + _GENERATION)
# Qwen2.5-VL: a conversation that does not open with a system turn gets the family's default one.
QWEN2_5_VL_TEMPLATE = (
    _COUNTERS + "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n" + _CONTENT + "<|im_end|>\n{% endfor %}" + _GENERATION)
# Qwen3-VL (Instruct): no default system prompt; a system turn keeps its text parts only. The
# processor, not the template, puts a video's frame timestamps around its tokens.
QWEN3_VL_TEMPLATE = (
    _COUNTERS + "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'system' and message['content'] is not string %}"
    "{% for part in message['content'] %}{% if 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% else %}" + _CONTENT + "{% endif %}<|im_end|>\n{% endfor %}" + _GENERATION)


def mrope_section(head_dim: int, *, interleaved: bool = False) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width).

    Blocks (Qwen2-VL, Qwen2.5-VL): roughly 1:1.5:1.5, e.g. [16, 24, 24] for head_dim 128.
    Interleaved (Qwen3-VL): height and width take every third frequency from index 1 and 2 for
    section[k] * 3 positions, time the rest, so each gets 5/16 of them: [24, 20, 20] for head_dim 128.
    """
    half = head_dim // 2
    hw = (half * 5) // 16 if interleaved else (half * 3) // 8
    return [half - 2 * hw, hw, hw]


def _qwen2_vl_text(spec) -> dict:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": mrope_section(spec.head_dim)}}


def _qwen3_vl_text(spec) -> dict:
    return {"head_dim": spec.head_dim,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                "mrope_section": mrope_section(spec.head_dim, interleaved=True)}}


def _qwen2_vl_vision(spec) -> dict:
    return dict(depth=spec.vision_depth, embed_dim=spec.vision_embed, num_heads=spec.vision_heads, mlp_ratio=2,
                hidden_size=spec.hidden_size, in_channels=3, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2)


def _qwen2_5_vl_vision(spec) -> dict:
    # window attention over 2x2 merged tokens (56 pixels) in every block but the last, which sees the whole image
    return dict(depth=spec.vision_depth, hidden_size=spec.vision_embed, intermediate_size=2 * spec.vision_embed,
                num_heads=spec.vision_heads, out_hidden_size=spec.hidden_size, in_channels=3, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                fullatt_block_indexes=[spec.vision_depth - 1])


def _qwen3_vl_vision(spec) -> dict:
    # learned position embeddings on an 8x8 grid (interpolated to the image's), one DeepStack level
    return dict(depth=spec.vision_depth, hidden_size=spec.vision_embed, intermediate_size=2 * spec.vision_embed,
                num_heads=spec.vision_heads, out_hidden_size=spec.hidden_size, in_channels=3, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                deepstack_visual_indexes=[0])


@dataclass(frozen=True)
class Family:
    """One model family: its classes, tiny sizes, template and conventions."""

    name: str                       # the registry key, equal to config.json's `model_type`
    title: str                      # the publisher's name for it
    coords: Convention              # how its grounding answers write boxes and points (module docstring)
    patch_size: int                 # vision patch side in pixels (x merge_size = the resize factor)
    chat_template: str              # what the tiny factory installs: the family's own conventions
    config_cls: type
    model_cls: type
    processor_cls: type
    video_processor_cls: type
    tiny_text: Callable[[Any], dict]     # TinySpec -> the family's own text_config entries
    tiny_vision: Callable[[Any], dict]   # TinySpec -> vision_config
    image_norm: tuple[float, float] | None = None   # tiny processor's pixel mean and std (None: OpenAI CLIP's)
    merger_prefixes: tuple[str, ...] = ("visual.merger.",)   # the vision-to-LLM projection(s), in parameter names
    video_frames: int = 1           # frames the video processor's pixel budget covers (Qwen3-VL's spans a clip)

    def image_tokens(self, grid_thw: Tensor, merge_size: int) -> Tensor:
        """LLM tokens of each image, (I, 3) grids in patches -> (I,): a merge x merge block of
        patches becomes one token."""
        return grid_thw.prod(-1) // (merge_size * merge_size)

    def tiny_processor(self, tok, spec):
        """The family's processor around the tiny tokenizer, with the tiny pixel bounds."""
        pixels = dict(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
        patches = dict(patch_size=self.patch_size, temporal_patch_size=2, merge_size=2)
        norm = {} if self.image_norm is None else dict(image_mean=[self.image_norm[0]] * 3,
                                                        image_std=[self.image_norm[1]] * 3)
        image = Qwen2VLImageProcessor(**pixels, **patches, **norm)
        video = self.video_processor_cls(
            size={"shortest_edge": spec.min_pixels, "longest_edge": self.video_frames * spec.max_pixels},
            **patches, **norm)
        return self.processor_cls(image_processor=image, tokenizer=tok, video_processor=video,
                                  chat_template=self.chat_template)

    def tiny_config(self, spec, *, vocab_size: int, ids: dict[str, int]):
        """The family's config at the tiny sizes of `spec` (a model.tiny.TinySpec); `ids` maps the
        chat/vision special tokens to their ids."""
        text = dict(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                    num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                    num_key_value_heads=spec.num_kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                    tie_word_embeddings=False, **self.tiny_text(spec))
        return self.config_cls(
            text_config=text, vision_config=self.tiny_vision(spec),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2_vl", "Qwen2-VL", coords="norm1000", patch_size=14, chat_template=QWEN2_VL_TEMPLATE,
           config_cls=Qwen2VLConfig, model_cls=Qwen2VLForConditionalGeneration, processor_cls=Qwen2VLProcessor,
           video_processor_cls=Qwen2VLVideoProcessor, tiny_text=_qwen2_vl_text, tiny_vision=_qwen2_vl_vision),
    Family("qwen2_5_vl", "Qwen2.5-VL", coords="resized", patch_size=14, chat_template=QWEN2_5_VL_TEMPLATE,
           config_cls=Qwen2_5_VLConfig, model_cls=Qwen2_5_VLForConditionalGeneration,
           processor_cls=Qwen2_5_VLProcessor, video_processor_cls=Qwen2VLVideoProcessor,
           tiny_text=_qwen2_vl_text, tiny_vision=_qwen2_5_vl_vision),
    Family("qwen3_vl", "Qwen3-VL", coords="norm1000", patch_size=16, chat_template=QWEN3_VL_TEMPLATE,
           config_cls=Qwen3VLConfig, model_cls=Qwen3VLForConditionalGeneration, processor_cls=Qwen3VLProcessor,
           video_processor_cls=Qwen3VLVideoProcessor, tiny_text=_qwen3_vl_text, tiny_vision=_qwen3_vl_vision,
           image_norm=(0.5, 0.5), merger_prefixes=("visual.merger.", "visual.deepstack_merger_list."),
           video_frames=8),
)}
DEFAULT_FAMILY = "qwen2_vl"


def get_family(name: str) -> Family:
    """The adapter registered as `name`; a ValueError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; vlrl knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(path: str | os.PathLike) -> Family:
    """The family of an HF model folder, from its config.json `model_type`."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    model_type = json.loads(cfg.read_text()).get("model_type", "?")
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not a family vlrl knows ({', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def family_of_processor(processor) -> Family | None:
    """The family whose processor class `processor` is (None for another processor)."""
    return next((f for f in FAMILIES.values() if type(processor) is f.processor_cls), None)


def image_token_counts(processor, grid_thw: Tensor) -> Tensor:
    """(I,) LLM tokens of each image from the processor's (I, 3) `image_grid_thw`, by the family's rule
    (the merge rule of Qwen-style processors for a processor of no known family)."""
    merge = getattr(processor.image_processor, "merge_size", 2)
    family = family_of_processor(processor) or FAMILIES[DEFAULT_FAMILY]
    return family.image_tokens(grid_thw, merge)


@dataclass(frozen=True)
class ResizeSettings:
    """The processor's image resize: sides multiples of `factor`, area in [min_pixels, max_pixels]."""

    factor: int
    min_pixels: int
    max_pixels: int


def resize_settings(processor) -> ResizeSettings:
    """The resize the processor's image processor applies (see verifiers.coords.resized_size)."""
    ip = processor.image_processor
    size = getattr(ip, "size", None) or {}
    lo = getattr(ip, "min_pixels", None) or size.get("shortest_edge")
    hi = getattr(ip, "max_pixels", None) or size.get("longest_edge")
    return ResizeSettings(factor=ip.patch_size * ip.merge_size, min_pixels=int(lo), max_pixels=int(hi))


def verifier_settings(processor) -> dict[str, dict[str, Any]]:
    """{verifier name: settings} that the processor's model family's output conventions give the
    verifiers (its grounding coordinates); see rewards.config.RewardConfig.with_verifier_settings."""
    grounding = grounding_settings(processor)
    return {"grounding": grounding} if grounding else {}


def grounding_settings(processor) -> dict[str, Any]:
    """The grounding verifier's settings for answers of this processor's model: its family's
    coordinate convention and, for resized pixels, the resize (verifiers.grounding)."""
    family = family_of_processor(processor)
    if family is None:
        return {}
    r = resize_settings(processor)
    out: dict[str, Any] = {"coords": family.coords}
    if family.coords == "resized":
        out.update(resize_factor=r.factor, min_pixels=r.min_pixels, max_pixels=r.max_pixels)
    return out

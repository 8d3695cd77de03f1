"""The embedded tiny models: a Qwen2-VL (the default), Qwen2.5-VL or Qwen3-VL built locally
(tokenizer trained here, random init).

Each has its family's real architecture (vision tower, 2x2 patch merger, M-RoPE decoder; Qwen2.5-VL's
window attention, Qwen3-VL's DeepStack and interleaved M-RoPE), processor and chat template
(model.families), so transformers and vLLM load it like any folder of that family; it is only small.
Deterministic for a seed and a family.
"""
from __future__ import annotations

import dataclasses

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from model.families import DEFAULT_FAMILY, QWEN2_VL_TEMPLATE, get_family

# The Qwen2-VL chat/vision special tokens, in Qwen's order.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Reasoning tags are ordinary added tokens (not special), so decoding keeps them.
THINK_TOKENS = ["<think>", "</think>"]

CHAT_TEMPLATE = QWEN2_VL_TEMPLATE   # the default family's; each family's processor gets its own
# Qwen2's pre-tokenizer split: digits one by one, which suits counts and coordinates.
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny VLM. head_dim must be one vLLM's CPU attention supports (32, 64, 80, ...)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 1
    vision_depth: int = 2
    vision_embed: int = 64
    vision_heads: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Presets of the same architecture. tiny: the embedded default (~1.3M parameters, 56-112 px
# images), for tests and the demo. small: ~35M parameters and images up to 224 px, where compute
# (not Python overhead) dominates a step: for benchmarks (bench.rollout, bench.train_step).
SIZES: dict[str, TinySpec] = {
    "tiny": TinySpec(),
    "small": TinySpec(hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8, num_kv_heads=2,
                      vision_depth=4, vision_embed=256, vision_heads=4, min_pixels=112 * 112, max_pixels=224 * 224),
}


def size_spec(size: str, *, seed: int = 0) -> TinySpec:
    """The preset `size` (tiny, small) with `seed`; ValueError naming the presets otherwise."""
    if size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {', '.join(SIZES)}")
    return dataclasses.replace(SIZES[size], seed=seed)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, wrapped as a Qwen2 tokenizer with the chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(THINK_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        model_max_length=4096, padding_side="left")
    tok.add_tokens(THINK_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_vlm(out: str | os.PathLike, texts: list[str], spec: TinySpec = TinySpec(),
                   family: str = DEFAULT_FAMILY) -> Path:
    """Write a complete HF folder (weights, config, tokenizer, processor) for a tiny VLM of `family`
    (model.families: qwen2_vl, qwen2_5_vl, qwen3_vl).

    `texts` is the tokenizer's training corpus. The folder appears atomically: it is built in a
    temporary sibling and renamed into place.
    """
    fam = get_family(family)
    torch.manual_seed(spec.seed)
    tok = train_tokenizer(texts, spec.vocab_size)
    tok.chat_template = fam.chat_template
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    processor = fam.tiny_processor(tok, spec)
    model = fam.model_cls(fam.tiny_config(spec, vocab_size=len(tok), ids=ids))
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {"family": fam.name, "builder": "vlrl tiny", **asdict(spec),
                "params": sum(p.numel() for p in model.parameters())}
        (tmp / "vlrl_tiny.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

"""Prompt rendering shared by the engines and the trainer, and the trainer-side batch of
prompt + response token ids built from completions (`SequenceBatch`, its images and video clips in
`VisionInputs`).

A record becomes a `Prompt` through `prompt_from_record` (`records.load_media`: images, sampled video
clips, timestamps). Both engines render a `Prompt` with `render_prompt` (the processor's chat
template), so the prompt tokens the trainer sees here are the ones the engine sampled from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from records import VideoGeometry, count_parts, load_media
from rollout.types import Completion, Prompt


def prompt_from_record(rec, geometry: VideoGeometry = VideoGeometry()) -> Prompt:
    """The prompt turns of a record with its images and sampled, timestamped video clips;
    `geometry` is the model's (`VideoGeometry.of(processor)`)."""
    media = load_media(rec, geometry=geometry)
    return Prompt(media.messages, media.images, media.videos)


def render_prompt(processor, prompt: Prompt) -> str:
    """Chat-template text of the prompt turns with the assistant generation prompt appended (one
    placeholder per image or video part; the processor / vLLM expand it to its tokens)."""
    return processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)


# Tokens that mark image/video slots in a Qwen2/2.5-VL prompt. A response must never contain them:
# the trainer's forward would take a sampled <|image_pad|> for an image slot (a random or drifting
# policy does sample them), so the engines ban them at sampling time.
_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def vision_token_ids(processor) -> list[int]:
    """Ids of the vision placeholder/marker tokens the tokenizer knows (banned in responses)."""
    tok = processor.tokenizer
    names = {getattr(processor, "image_token", None), getattr(processor, "video_token", None),
             getattr(tok, "vision_bos_token", None), getattr(tok, "vision_eos_token", None), *_VISION_TOKENS}
    vocab = tok.get_vocab()
    return sorted({vocab[t] for t in names if t in vocab})


def encode_prompt(processor, prompt: Prompt) -> dict[str, torch.Tensor]:
    """Processor outputs of one prompt, unpadded: input_ids (1, P), mm_token_type_ids (1, P), for
    images pixel_values (patches, D) and image_grid_thw (images, 3), for videos pixel_values_videos
    (patches, D) and video_grid_thw (clips, 3)."""
    for kind, items in (("image", prompt.images), ("video", prompt.videos)):
        n_parts = count_parts(prompt.messages, kind)
        if n_parts != len(items):
            raise ValueError(f"prompt has {n_parts} {kind} parts but {len(items)} {kind}s")
    return dict(processor(text=[render_prompt(processor, prompt)], images=list(prompt.images) or None,
                          videos=list(prompt.videos) or None, return_tensors="pt"))


def _rows_of(values: torch.Tensor | None, grid: torch.Tensor | None, per_row: torch.Tensor,
             rows: Sequence[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(patches, grid) of the items (images or clips) of `rows`, in row order; (None, None) if none."""
    if grid is None:
        return None, None
    end = per_row.cumsum(0)                     # (B,)
    start = end - per_row
    patches = grid.prod(-1)                     # (N,) patches per item
    patch_end = patches.cumsum(0)
    patch_start = patch_end - patches
    items = [i for r in rows for i in range(int(start[r]), int(end[r]))]
    if not items:
        return None, None
    return torch.cat([values[int(patch_start[i]):int(patch_end[i])] for i in items]), grid[items]


@dataclass(frozen=True)
class VisionInputs:
    """The image and video inputs of a batch's rows, with which images and clips belong to which row:
    a row's patches travel with it through micro-batching and row selection, so vision features and
    vision tokens always match."""

    pixel_values: torch.Tensor | None     # (P, D) patches of every image, rows in order, images in order
    image_grid_thw: torch.Tensor | None   # (I, 3) (t, h, w) in patches of each image
    images_per_row: torch.Tensor          # (B,) images of each row (0 for a row without)
    pixel_values_videos: torch.Tensor | None = None   # (Pv, D) patches of every video clip, rows in order
    video_grid_thw: torch.Tensor | None = None        # (V, 3) (t, h, w) in patches of each clip
    videos_per_row: torch.Tensor | None = None        # (B,) video clips of each row (None: no row has one)

    def select(self, rows: Sequence[int]) -> VisionInputs | None:
        """The images and clips of `rows`, in that order; None when none of them has either."""
        rows = list(rows)
        pixel_values, image_grid = _rows_of(self.pixel_values, self.image_grid_thw, self.images_per_row, rows)
        videos_per_row = self.videos_per_row
        if videos_per_row is None:
            videos_per_row = torch.zeros_like(self.images_per_row)
        video_values, video_grid = _rows_of(self.pixel_values_videos, self.video_grid_thw, videos_per_row, rows)
        if image_grid is None and video_grid is None:
            return None
        return VisionInputs(pixel_values=pixel_values, image_grid_thw=image_grid,
                            images_per_row=self.images_per_row[rows], pixel_values_videos=video_values,
                            video_grid_thw=video_grid, videos_per_row=videos_per_row[rows])

    def to(self, device: torch.device | str) -> VisionInputs:
        def move(t):
            return None if t is None else t.to(device)
        return VisionInputs(move(self.pixel_values), move(self.image_grid_thw), self.images_per_row,
                            move(self.pixel_values_videos), move(self.video_grid_thw), self.videos_per_row)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The forward's vision keyword arguments (those present)."""
        out = {}
        if self.image_grid_thw is not None:
            out.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        if self.video_grid_thw is not None:
            out.update(pixel_values_videos=self.pixel_values_videos, video_grid_thw=self.video_grid_thw)
        return out


@dataclass(frozen=True)
class SequenceBatch:
    """Prompt + response rows as model inputs, right-padded. Causal-LM alignment: logits[:, :-1]
    predict input_ids[:, 1:], so the RL tensors live on the T = L - 1 label positions and
    `label_mask` = response_mask[:, 1:] marks the sampled tokens."""

    input_ids: torch.Tensor          # (B, L) prompt ids + response ids, then pad
    attention_mask: torch.Tensor     # (B, L) 1 on prompt and response tokens
    response_mask: torch.Tensor      # (B, L) 1 on response tokens
    mm_token_type_ids: torch.Tensor  # (B, L) 1 on image, 2 on video tokens (transformers' Qwen2-VL M-RoPE reads it)
    prompt_index: torch.Tensor       # (B,) index of each row's prompt (rows are prompt-major)
    vision: VisionInputs | None = None

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> list[int]:
        """Each row's length in tokens (prompt, vision tokens and response; no padding)."""
        return self.attention_mask.sum(-1).tolist()

    @property
    def label_mask(self) -> torch.Tensor:
        """(B, T) float: 1 where the label (input_ids[:, t + 1]) is a response token."""
        return self.response_mask[:, 1:].float()

    def select(self, rows: Sequence[int]) -> SequenceBatch:
        """The sub-batch of `rows` (their images and clips included), trimmed to its longest row."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        width = int(self.attention_mask[idx].sum(-1).max())
        return SequenceBatch(
            input_ids=self.input_ids[idx, :width], attention_mask=self.attention_mask[idx, :width],
            response_mask=self.response_mask[idx, :width], mm_token_type_ids=self.mm_token_type_ids[idx, :width],
            prompt_index=self.prompt_index[idx], vision=None if self.vision is None else self.vision.select(rows))

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                             self.mm_token_type_ids.to(device), self.prompt_index,
                             None if self.vision is None else self.vision.to(device))

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward, on `device`."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.vision is not None:
            out.update(self.vision.model_inputs())
        out["mm_token_type_ids"] = self.mm_token_type_ids
        return out if device is None else {k: v.to(device) for k, v in out.items()}


def build_sequences(processor, prompts: Sequence[Prompt], completions: Sequence[Sequence[Completion]],
                    *, pad_token_id: int | None = None) -> SequenceBatch:
    """One row per completion, prompt-major (prompt 0's samples first), each prompt's images and video
    clips repeated for every one of its samples. The sampled-token log-probs are
    token_logp(logits[:, :-1], input_ids[:, 1:]) where `label_mask` is set."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion groups")
    pad = processor.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    banned = set(vision_token_ids(processor))
    rows, prompt_index = [], []
    vision: dict[str, list] = {k: [] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                               "images_per_row", "videos_per_row")}
    for i, (prompt, group) in enumerate(zip(prompts, completions)):
        enc = encode_prompt(processor, prompt)
        ids = enc["input_ids"][0]
        mtt = enc.get("mm_token_type_ids", torch.zeros_like(enc["input_ids"]))[0]
        for c in group:
            if banned.intersection(c.token_ids):
                raise ValueError(f"prompt {i}: a response contains a vision token {sorted(banned & set(c.token_ids))}; "
                                 "the trainer would read it as an image slot")
            resp = torch.tensor(c.token_ids, dtype=ids.dtype)
            rows.append((ids, resp, mtt))
            prompt_index.append(i)
            for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
                if key in enc:
                    vision[key].append(enc[key])
            vision["images_per_row"].append(len(enc["image_grid_thw"]) if "image_grid_thw" in enc else 0)
            vision["videos_per_row"].append(len(enc["video_grid_thw"]) if "video_grid_thw" in enc else 0)
    B = len(rows)
    L = max((len(p) + len(r) for p, r, _ in rows), default=0)
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    response_mask = torch.zeros(B, L, dtype=torch.long)
    mm_token_type_ids = torch.zeros(B, L, dtype=torch.long)
    for b, (p, r, mtt) in enumerate(rows):
        P, R = len(p), len(r)
        input_ids[b, :P], input_ids[b, P:P + R] = p, r
        attention_mask[b, :P + R] = 1
        response_mask[b, P:P + R] = 1
        mm_token_type_ids[b, :P] = mtt
    inputs = None
    if vision["image_grid_thw"] or vision["video_grid_thw"]:
        def cat(key):
            return torch.cat(vision[key]) if vision[key] else None
        inputs = VisionInputs(pixel_values=cat("pixel_values"), image_grid_thw=cat("image_grid_thw"),
                              images_per_row=torch.tensor(vision["images_per_row"], dtype=torch.long),
                              pixel_values_videos=cat("pixel_values_videos"), video_grid_thw=cat("video_grid_thw"),
                              videos_per_row=torch.tensor(vision["videos_per_row"], dtype=torch.long))
    return SequenceBatch(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                         mm_token_type_ids=mm_token_type_ids, prompt_index=torch.tensor(prompt_index, dtype=torch.long),
                         vision=inputs)


def engine_logp(completions: Sequence[Sequence[Completion]], mask: torch.Tensor) -> torch.Tensor:
    """The engine's sampled-token log-probs laid out like the trainer's: (B, T) on the label
    positions `mask` (B, T) marks (`response_mask[:, 1:]` of `build_sequences`), 0 elsewhere.
    Rows follow `build_sequences` (prompt-major)."""
    flat = [c for group in completions for c in group]
    if len(flat) != mask.shape[0]:
        raise ValueError(f"{len(flat)} completions for {mask.shape[0]} rows")
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for b, c in enumerate(flat):
        pos = mask[b].nonzero().flatten()
        if len(c.logp) != len(pos):
            raise ValueError(f"row {b}: the engine returned {len(c.logp)} log-probs for {len(pos)} response tokens")
        out[b, pos] = torch.tensor(c.logp, dtype=torch.float32)
    return out

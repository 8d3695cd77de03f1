"""A generative pairwise judge: a VLM shown the image, the question and two answers, asked which is
better ("A" or "B"). The verdict is read from the log-probs of the two letter tokens at the first
answer position (no sampling), and every pair is asked in both orders and averaged
(`rewards.preference.both_order_preference`), so a judge's preference for a position cancels out.

Three ways to use it:
  judge.compare([(images, prompt, x, y), ...])  -> P(x better than y) per pair, in [0, 1]
  a route's `use_judge: true`                   -> the hybrid reward's judge component (`judge=` of
      rewards.hybrid.score_batch, set up by `load_judge(RewardConfig.judge)`): each sample against
      its reference answer or against the other samples of its prompt
  ReferenceJudge(judge, reference)              -> the hybrid reward's `rm=` callable: a solution's
      score is P(solution better than the reference answer) for its prompt, so 0.5 means "as good as
      the reference". The reference is a callable (images, prompt) -> str: e.g. the SFT policy's greedy
      answer cached per prompt, or a ground-truth description where one exists.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from model.load import load_vlm
from model.reward import split_media
from rewards.config import JudgeConfig
from rewards.preference import both_order_preference

JUDGE_TEMPLATE = ("Question: {question}\n"
                  "Answer A: {a}\n"
                  "Answer B: {b}\n"
                  "Which answer is better? Reply with one letter, A or B.")

# (images, prompt text or messages, answer x, answer y)
PairItem = tuple[Sequence[Any], Any, str, str]


def media_and_question(prompt: str | Sequence[dict], n_images: int) -> tuple[list[dict], str]:
    """(the media parts of the judge's user turn, the question) of a prompt: for a text prompt its
    `n_images` images and the text; for a message list (a video record's, `records.load_media`: each
    clip after its timestamp text) the user turns' media parts in order, each clip with its timestamp,
    and their other texts as the question."""
    if isinstance(prompt, str):
        return [{"type": "image"}] * n_images, prompt
    parts = [p for m in prompt if m["role"] == "user"
             for p in ([{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"])]
    if not parts:
        raise ValueError("the prompt has no user turn")
    media, question = [], []
    for i, p in enumerate(parts):
        before_clip = i + 1 < len(parts) and parts[i + 1].get("type") == "video"
        if p.get("type") == "text" and not before_clip:
            question.append(p["text"])
        else:
            media.append(p)
    return media, "\n".join(question)


class PairwiseJudge:
    """Wraps a causal VLM (anything returning `.logits` (B, L, V)) and its processor.

    template: the judge's instruction with {question}, {a}, {b}. answer_prefix: text appended after the
    generation prompt before the letter is read (e.g. an empty think block for a reasoning model, so
    the letter is the first token it would emit). labels: the two verdict strings, one token each.
    """

    def __init__(self, model, processor, *, template: str = JUDGE_TEMPLATE, answer_prefix: str = "",
                 labels: tuple[str, str] = ("A", "B"), batch_size: int = 8,
                 image_root: str | os.PathLike | None = None):
        self.model, self.processor = model, processor
        self.template, self.answer_prefix, self.batch_size = template, answer_prefix, batch_size
        self.image_root = None if image_root is None else Path(image_root)
        ids = []
        for label in labels:
            tok = processor.tokenizer.encode(label, add_special_tokens=False)
            if len(tok) != 1:
                raise ValueError(f"verdict label {label!r} is {len(tok)} tokens for this tokenizer; need exactly 1")
            ids.append(tok[0])
        self.label_ids = torch.tensor(ids)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu",
                        **kw) -> PairwiseJudge:
        model, processor = load_vlm(path, dtype=dtype, device=device)
        return cls(model, processor, **kw)

    def _text(self, n_images: int, prompt: Any, a: str, b: str) -> str:
        media, question = media_and_question(prompt, n_images)
        msg = [{"role": "user", "content": media + [
            {"type": "text", "text": self.template.format(question=question, a=a, b=b)}]}]
        return self.processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) + self.answer_prefix

    @torch.no_grad()
    def letter_logp(self, items: Sequence[PairItem]) -> torch.Tensor:
        """log p("A"), log p("B") at the verdict position with x shown as A and y as B: (N, 2) float32."""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            media = [split_media(ims, self.image_root) for ims, _, _, _ in chunk]
            texts = [self._text(len(ims), p, x, y) for (_, p, x, y), (ims, _) in zip(chunk, media)]
            side = self.processor.tokenizer.padding_side
            self.processor.tokenizer.padding_side = "left"  # the verdict position is then the last one
            try:
                batch = self.processor(text=texts, images=[im for ims, _ in media for im in ims] or None,
                                       videos=[c for _, clips in media for c in clips] or None,
                                       return_tensors="pt", padding=True)
            finally:
                self.processor.tokenizer.padding_side = side
            logits = self.model(**{k: v.to(device) for k, v in batch.items()}).logits[:, -1].float()  # (b, V)
            out.append(torch.log_softmax(logits, -1)[:, self.label_ids.to(device)].cpu())
        return torch.cat(out) if out else torch.zeros(0, 2)

    def compare(self, items: Sequence[PairItem]) -> list[float]:
        """P(x better than y) per (images, prompt, x, y), averaged over both presentation orders."""
        swapped = [(ims, p, y, x) for ims, p, x, y in items]
        lp = self.letter_logp(list(items) + swapped)  # (2N, 2)
        xy, yx = lp[:len(items)], lp[len(items):]
        return both_order_preference(xy[:, 0], xy[:, 1], yx[:, 0], yx[:, 1]).tolist()


class ReferenceJudge:
    """Pointwise scores from a pairwise judge: P(solution better than `reference(images, prompt)`).

    Same shape as the scalar RM (`rewards.hybrid.RewardModel`): items (images, prompt, solution) -> floats.
    """

    def __init__(self, judge: PairwiseJudge, reference: Callable[[Sequence[Any], Any], str]):
        self.judge, self.reference = judge, reference

    def __call__(self, items: Sequence[tuple[Sequence[Any], Any, str]]) -> list[float]:
        return self.judge.compare([(ims, p, sol, self.reference(ims, p)) for ims, p, sol in items])


def load_judge(cfg: JudgeConfig, *, device: str = "cpu") -> PairwiseJudge:
    """The judge of a reward config's `judge` section."""
    return PairwiseJudge.from_pretrained(cfg.model, dtype=cfg.dtype, device=device, batch_size=cfg.batch_size,
                                         answer_prefix=cfg.answer_prefix)


class TimedJudge:
    """A judge as the hybrid reward calls it (pairs -> P(x better than y)), counting its cost: seconds
    spent and calls (each pair is asked twice, once in each order)."""

    def __init__(self, judge: PairwiseJudge):
        self.judge, self.seconds, self.calls = judge, 0.0, 0

    def __call__(self, pairs: Sequence[PairItem]) -> list[float]:
        t0 = time.perf_counter()
        out = self.judge.compare(pairs)
        self.seconds += time.perf_counter() - t0
        self.calls += 2 * len(pairs)
        return out

    def take(self) -> dict[str, float]:
        """{judge/seconds, judge/calls} since the previous take, and reset."""
        out = {"judge/seconds": self.seconds, "judge/calls": float(self.calls)}
        self.seconds, self.calls = 0.0, 0
        return out

"""The transformers `generate` backend: the fallback where vLLM does not run, and a reference for it.

Each prompt is repeated n times in one left-padded batch. Log-probs come from the raw logits
(`output_logits=True`, before temperature/top-k/top-p), so they mean what vLLM's raw logprobs mean.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from model.load import load_vlm
from rollout.sequences import render_prompt, vision_token_ids
from rollout.types import Completion, EngineConfig, Prompt, SamplingConfig


class HFEngine:
    """`Engine` on an `AutoModelForImageTextToText` in this process."""

    def __init__(self, model: str, cfg: EngineConfig, *, seed: int = 0):
        # `seed` is accepted for the Engine signature: a call's SamplingConfig.seed seeds sampling here
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor = load_vlm(model, dtype=cfg.dtype or "float32", device=device)
        self.model.eval()
        self.device = torch.device(device)
        gen = self.model.generation_config
        eos = gen.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.eos_ids.add(self.processor.tokenizer.eos_token_id)
        self.banned_ids = vision_token_ids(self.processor)
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else self.processor.tokenizer.pad_token_id

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Completion]]:
        n = sampling.n
        texts = [render_prompt(self.processor, p) for p in prompts for _ in range(n)]
        images = [im for p in prompts for _ in range(n) for im in p.images]
        videos = [clip for p in prompts for _ in range(n) for clip in p.videos]
        tok = self.processor.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = self.processor(text=texts, images=images or None, videos=videos or None, return_tensors="pt",
                                 padding=True)
        finally:
            tok.padding_side = side
        enc = {k: v.to(self.device) for k, v in enc.items()}
        greedy = sampling.temperature == 0
        kw = dict(do_sample=not greedy, max_new_tokens=sampling.max_tokens, eos_token_id=sorted(self.eos_ids),
                  pad_token_id=self.pad_id,
                  suppress_tokens=self.banned_ids, output_logits=True, return_dict_in_generate=True)
        if not greedy:
            kw.update(temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k if sampling.top_k > 0 else 0)
        with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(**enc, **kw)
        P = enc["input_ids"].shape[1]
        new = out.sequences[:, P:]  # (B*n, T)
        logits = torch.stack(out.logits, 1).float()  # (B*n, T, V) raw, before the sampler's warpers
        logp = torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0]
        result: list[list[Completion]] = []
        for i in range(len(prompts)):
            group = []
            for row in range(i * n, (i + 1) * n):
                ids = new[row].tolist()
                stop = next((t for t, x in enumerate(ids) if x in self.eos_ids), None)
                end = len(ids) if stop is None else stop + 1
                group.append(Completion(token_ids=ids[:end], logp=logp[row, :end].tolist(),
                                        text=tok.decode(ids[:end], skip_special_tokens=True),
                                        finish_reason="length" if stop is None else "stop"))
            result.append(group)
        return result

    @torch.no_grad()
    def sync_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy `state` (HF names; whole or partial) into the model."""
        self.load_weights(state)

    @torch.no_grad()
    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        unexpected = self.model.load_state_dict(dict(state), strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"sync_weights: names not in the model: {unexpected[:5]}")

    def finish_sync(self) -> None:
        """Nothing is cached across calls."""

    def sleep(self) -> None:
        """The HF engine keeps its weights (it serves tests and small models)."""

    def wake_up(self) -> None:
        """See `sleep`."""

    def close(self) -> None:
        self.model = None

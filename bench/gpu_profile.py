"""GPU profile: random-init Qwen2.5-VL-3B/7B (configs written here, nothing downloaded; speed does
not depend on weight values), rollout at a fixed response length (EOS ignored), weight sync and one
actor update, reported as tokens/s per GPU and actor MFU against EasyR1's published figures
(Qwen2.5-VL-7B GRPO on 8xH100: ~2,000 tokens/s/GPU, actor MFU ~23%).

    python -m bench.gpu_profile --size 7b [--prompts 64 --n 8 --response-tokens 1024]

Needs a CUDA GPU; exits with a message otherwise. One GPU, colocated like EasyR1: the vLLM engine
generates, is closed, then the actor (bf16 AdamW, gradient checkpointing) takes the same batch.
FLOPs follow verl's counter (which EasyR1 reports): 6 x dense decoder parameters x tokens plus
12 x sum(seq_len^2) x head_dim x heads x layers for attention; the vision tower is left out.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

from bench.common import best_time, fmt, throughput, write_result
from bench.scratch import default_scratch, tiny_model
from bench.train_step import fixed_batch
from model.load import load_processor
from records import load_images, load_records
from rl.config import PPOConfig
from rl.driver import minibatch_rows
from rl.workers import PolicyWorker
from rollout import make_engine
from rollout.sequences import render_prompt
from rollout.types import EngineConfig, Prompt
from synth.suite import SceneSpec, write_suite
from training.optim import OptimConfig

EASYR1 = {"model": "Qwen2.5-VL-7B", "algo": "GRPO", "gpus": "8xH100", "tokens_per_s_per_gpu": 2000.0, "actor_mfu": 0.23}
# bf16 dense peak FLOP/s by device-name fragment (vendor data sheets, SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}

# Qwen2.5-VL decoder sizes as published in the models' config.json files
TEXT = {
    "3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
              tokens_per_second=2, hidden_act="silu")


# ----------------------------------------------------------------------------- pure arithmetic

def dense_params(t: dict) -> int:
    """Matmul parameters of the decoder: q/k/v/o and the gated MLP in every layer, plus the LM head
    (embeddings are lookups, norms and biases are negligible; verl's `dense_N`)."""
    h, layers = t["hidden_size"], t["num_hidden_layers"]
    head_dim = h // t["num_attention_heads"]
    q_o = 2 * h * t["num_attention_heads"] * head_dim
    k_v = 2 * h * t["num_key_value_heads"] * head_dim
    mlp = 3 * h * t["intermediate_size"]
    return layers * (q_o + k_v + mlp) + t["vocab_size"] * h


def train_flops(t: dict, seq_lens: list[int]) -> float:
    """FLOPs of one forward + backward over sequences of these lengths (verl's FlopsCounter):
    6 N_dense sum(L) + 12 sum(L^2) head_dim heads layers."""
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    dense = 6 * dense_params(t) * sum(seq_lens)
    attn = 12 * sum(s * s for s in seq_lens) * head_dim * t["num_attention_heads"] * t["num_hidden_layers"]
    return float(dense + attn)


def mfu(flops: float, seconds: float, *, peak_flops: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' peak."""
    if seconds <= 0 or peak_flops <= 0 or n_devices <= 0:
        return 0.0
    return flops / seconds / (peak_flops * n_devices)


def peak_flops_for(device_name: str) -> float | None:
    """bf16 dense peak of a known GPU (by name), else None."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


# ----------------------------------------------------------------------------- GPU work

SPECIAL_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def model_config(size: str, ids: dict[str, int]):
    """The Qwen2.5-VL config of a size, with the special-token ids of the tokenizer in use."""
    text = dict(TEXT[size], max_position_embeddings=32768, rms_norm_eps=1e-6, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(VISION, out_hidden_size=text["hidden_size"]),
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                            tie_word_embeddings=text["tie_word_embeddings"])


def build_model(out: Path, size: str, tokenizer_dir: Path) -> Path:
    """A random-init Qwen2.5-VL folder (bf16, built on the GPU) with the tiny VLM's tokenizer: token
    ids stay below its vocabulary, which is all generation and training need."""
    if (out / "config.json").is_file():
        return out

    tiny = load_processor(tokenizer_dir)
    tok = tiny.tokenizer
    cfg = model_config(size, {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    pixel_kw = dict(patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixel_kw), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**pixel_kw), chat_template=tiny.chat_template)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def rollout_fixed_length(engine, prompts, *, n: int, response_tokens: int) -> tuple[float, int]:
    """(seconds, generated tokens) of one vLLM call with EOS ignored, through the engine's own
    `vllm.LLM` and prompt rendering (the `Engine` protocol has no ignore-EOS switch)."""
    from vllm import SamplingParams


    requests = [{"prompt": render_prompt(engine.processor, p), "multi_modal_data": {"image": list(p.images)}}
                for p in prompts]
    params = SamplingParams(n=n, temperature=1.0, max_tokens=response_tokens, min_tokens=response_tokens,
                            ignore_eos=True, logprobs=0, logit_bias={t: -100.0 for t in engine.banned_ids})
    t0 = time.perf_counter()
    outs = engine.llm.generate(requests, params, use_tqdm=False)
    return time.perf_counter() - t0, sum(len(c.token_ids) for o in outs for c in o.outputs)


def profile(size: str, scratch: Path, *, prompts: int, n: int, response_tokens: int, micro_batch_size: int,
            peak: float) -> dict:
    """Rollout tokens/s, weight-sync seconds, actor update tokens/s and MFU on one GPU."""
    model_dir = build_model(scratch / "models" / f"qwen2_5_vl_{size}", size, tiny_model(scratch))
    data = scratch / "data448"
    if not (data / "rl.jsonl").is_file():  # 448x448 images: 256 vision tokens each, like a real VQA prompt
        write_suite(data, seed=0, n=1, n_heldout=1, n_rl=max(prompts, 8), tasks=("counting",),
                    spec=SceneSpec(grid=4, cell=112, size=80))
    records = load_records(data / "rl.jsonl", require="prompt")[:prompts]
    batch_prompts = [Prompt(r.prompt_messages, load_images(r)) for r in records]

    engine = make_engine(str(model_dir), EngineConfig(backend="vllm", dtype="bfloat16", enforce_eager=False,
                                                      gpu_memory_utilization=0.85, max_model_len=4096), seed=0)
    try:
        rollout_fixed_length(engine, batch_prompts[:2], n=2, response_tokens=16)            # warm-up
        gen_s, gen_tokens = rollout_fixed_length(engine, batch_prompts, n=n, response_tokens=response_tokens)
        state = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            state.update(load_file(str(f), device="cuda"))
        engine.sync_weights(state)
        sync_s = engine.last_sync_seconds
        del state
    finally:
        engine.close()
    torch.cuda.empty_cache()

    actor = PolicyWorker(str(model_dir), optim=OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant"),
                         total_steps=100, dtype="bfloat16")
    actor.model.gradient_checkpointing_enable()
    batch = fixed_batch(actor.processor, str(data / "rl.jsonl"), prompts=prompts, n=n, response_tokens=response_tokens)
    rows = minibatch_rows(list(range(batch.rows)), minibatches=1, epochs=1, seed=0)
    ppo = PPOConfig(minibatches=1, micro_batch_size=micro_batch_size, lm_coef=0.0)
    batch.old_logp, _ = actor.logp(batch.seq, micro_batch_size=micro_batch_size)
    batch.ref_logp = batch.old_logp
    logp_s = best_time(lambda: actor.logp(batch.seq, micro_batch_size=micro_batch_size), 1)
    update_s = best_time(lambda: actor.update(batch, ppo=ppo, kl_mode="reward", kl_kind="k3", minibatch_rows=rows), 1)
    seq_lens = batch.seq.attention_mask.sum(-1).tolist()
    tokens = sum(seq_lens)
    flops = train_flops(TEXT[size], seq_lens)
    step_s = gen_s + sync_s + logp_s + update_s
    return {
        "model": f"Qwen2.5-VL-{size.upper()} (random init)", "dense_params": dense_params(TEXT[size]),
        "sequences": len(seq_lens), "tokens": tokens, "generated_tokens": gen_tokens,
        "rollout": {"seconds": gen_s, "tokens_per_s": throughput(gen_tokens, gen_s)},
        "weight_sync_s": sync_s,
        "actor_logp": {"seconds": logp_s, "tokens_per_s": throughput(tokens, logp_s)},
        "actor_update": {"seconds": update_s, "tokens_per_s": throughput(tokens, update_s),
                         "mfu": mfu(flops, update_s, peak_flops=peak)},
        "step": {"seconds": step_s, "tokens_per_s_per_gpu": throughput(tokens, step_s)},
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
    }


def headline(m: dict) -> list[str]:
    return [f"{m['model']}: rollout {fmt(m['rollout']['tokens_per_s'], 'tok/s')}, sync {fmt(m['weight_sync_s'], 's')}, "
            f"actor update {fmt(m['actor_update']['tokens_per_s'], 'tok/s')} (MFU {m['actor_update']['mfu']:.1%})",
            f"step (rollout + sync + logp + update): {fmt(m['step']['tokens_per_s_per_gpu'], 'tok/s/GPU')} "
            f"vs EasyR1 {EASYR1['tokens_per_s_per_gpu']:,.0f}; actor MFU vs EasyR1 {EASYR1['actor_mfu']:.0%}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(TEXT), default="7b")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--response-tokens", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the GPU (default: by name)")
    p.add_argument("--scratch", default=None)
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_profile needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "the CPU set is `make bench`")
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_for(name)
    if peak is None:
        raise SystemExit(f"unknown peak FLOP/s for {name!r}: pass --peak-tflops")
    scratch = Path(args.scratch) if args.scratch else default_scratch()
    m = profile(args.size, scratch, prompts=args.prompts, n=args.n, response_tokens=args.response_tokens,
                micro_batch_size=args.micro_batch_size, peak=peak)
    cfg = {k: getattr(args, k) for k in ("size", "prompts", "n", "response_tokens", "micro_batch_size")}
    result = {"config": {**cfg, "gpu": name, "peak_flops": peak}, "metrics": m, "reference": EASYR1,
              "ratios": {"tokens/s/GPU vs EasyR1": m["step"]["tokens_per_s_per_gpu"] / EASYR1["tokens_per_s_per_gpu"],
                         "actor MFU vs EasyR1": m["actor_update"]["mfu"] / EASYR1["actor_mfu"]},
              "headline": headline(m)}
    print(f"-> {write_result(f'gpu_profile_{args.size}', result, args.results_dir)}")
    print("\n".join(result["headline"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU profile: random-init Qwen2.5-VL-3B/7B (configs written here, nothing downloaded; speed does
not depend on weight values), one colocated RL step's parts through the production workers --
rollout on `--workers` vLLM replicas, actor log-probs and one update on an FSDP2 group of
`--workers` ranks, the bucketed weight sync from the group into every replica -- reported as
tokens/s per GPU, actor MFU and sync seconds against EasyR1's published figures (Qwen2.5-VL-7B
GRPO on 8xH100: ~2,000 tokens/s/GPU, actor MFU ~23%).

    python -m bench.gpu_profile --size 3b [--workers 1] [--prompts 64 --n 8 --response-tokens 1024]
    python -m bench.gpu_profile --size tiny --workers 2 --prompts 4 --n 2 --response-tokens 16   # CPU smoke run

Each rank and its replica share a GPU (half a Ray GPU each; the engines sleep during the update,
as in `ray.placement: colocated`). A random-init model rarely samples EOS from a 150k vocabulary,
so responses run to `--response-tokens`. FLOPs follow verl's counter (which EasyR1 reports):
6 x dense decoder parameters x tokens plus 12 x sum(seq_len^2) x head_dim x heads x layers for
attention; the vision tower is left out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

from bench.common import best_time, fmt, throughput, write_result
from bench.scratch import default_scratch, tiny_model
from bench.train_step import fixed_batch
from model.load import load_processor
from records import VideoGeometry, load_records
from rl.config import PPOConfig
from rl.driver import minibatch_rows
from rl.rollouts import Rollouts
from rl.workers import PolicyWorker
from rollout.sequences import prompt_from_record
from rollout.types import EngineConfig, SamplingConfig
from synth.suite import SceneSpec, write_suite
from training.distributed import FSDPConfig
from training.optim import OptimConfig
from training.placement import spawn, start_local_ray

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


def text_dims(model_dir: Path) -> dict:
    """The decoder sizes `dense_params`/`train_flops` read, from a model folder's config.json."""
    cfg = json.loads((model_dir / "config.json").read_text())
    text = {**cfg, **cfg.get("text_config", {})}
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")
    return {k: text[k] for k in keys}


def profile(model_dir: Path, data: Path, *, workers: int, prompts: int, n: int, response_tokens: int,
            micro_batch_size: int, peak: float | None, gpu: bool, memory_utilization: float = 0.3) -> dict:
    """One colocated RL step's parts, timed through the production workers: `workers` rollout
    replicas (one vLLM engine each) generate, sleep; an actor group of `workers` FSDP2 ranks takes
    log-probs and one update of the same-shaped batch; the engines wake and the group syncs its
    weights into every replica, bucket by bucket. On GPUs every rank and its replica share a GPU
    (half a Ray GPU each); on CPU (`gpu=False`: the tiny model, a smoke run) they share the cores."""
    records = load_records(data / "rl.jsonl", require="prompt")[:prompts]
    processor = load_processor(model_dir)
    geometry = VideoGeometry.of(processor)
    batch_prompts = [prompt_from_record(r, geometry) for r in records]
    share = 0.5 if gpu else 0.0
    dtype = "bfloat16" if gpu else "float32"
    import ray  # optional: the profile runs its workers on Ray
    own_ray = not ray.is_initialized()
    if own_ray:
        start_local_ray(num_cpus=max(2, 2 * workers))
    engine = EngineConfig(backend="vllm", dtype=dtype, enforce_eager=not gpu, enable_sleep_mode=gpu,
                          gpu_memory_utilization=memory_utilization, max_model_len=4096)
    rollouts = Rollouts(str(model_dir), engine, replicas=workers, use_ray=True, num_gpus=share)
    actor = None
    try:
        warm = SamplingConfig(n=2, max_tokens=8, seed=0)
        rollouts.generate(batch_prompts[:max(2, workers)], warm)
        sampling = SamplingConfig(n=n, max_tokens=response_tokens, temperature=1.0, seed=1)
        t0 = time.perf_counter()
        out = rollouts.generate(batch_prompts, sampling)
        gen_s = time.perf_counter() - t0
        gen_tokens = sum(len(c.token_ids) for group in out for c in group)
        rollouts.sleep()
        actor = spawn(PolicyWorker, str(model_dir), optim=OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant"),
                      total_steps=100, dtype=dtype, fsdp=FSDPConfig(grad_checkpointing=gpu), workers=workers,
                      use_ray=True, num_gpus=share, name="actor")
        batch = fixed_batch(processor, str(data / "rl.jsonl"), prompts=prompts, n=n, response_tokens=response_tokens)
        rows = minibatch_rows(list(range(batch.rows)), minibatches=1, epochs=1, seed=0)
        ppo = PPOConfig(minibatches=1, micro_batch_size=micro_batch_size, lm_coef=0.0)
        batch.old_logp, _ = actor.logp(batch.seq, micro_batch_size=micro_batch_size).result()
        batch.ref_logp = batch.old_logp
        logp_s = best_time(lambda: actor.logp(batch.seq, micro_batch_size=micro_batch_size).result(), 1)
        update_s = best_time(lambda: actor.update(batch, ppo=ppo, kl_mode="reward", kl_kind="k3",
                                                  minibatch_rows=rows).result(), 1)
        rollouts.wake_up()
        sync = actor.push_weights(rollouts.handles, sync_method=engine.sync_method).result()
    finally:
        if actor is not None:
            actor.kill()
        rollouts.close()
        if own_ray:
            ray.shutdown()
    if sync["failed"]:
        raise RuntimeError(f"the weight sync failed on replicas {sync['failed']}")
    seq_lens = batch.seq.attention_mask.sum(-1).tolist()
    tokens = sum(seq_lens)
    dims = text_dims(model_dir)
    flops = train_flops(dims, seq_lens)
    step_s = gen_s + sync["seconds"] + logp_s + update_s
    return {
        "workers": workers, "dense_params": dense_params(dims),
        "sequences": len(seq_lens), "tokens": tokens, "generated_tokens": gen_tokens,
        "rollout": {"seconds": gen_s, "tokens_per_s_per_device": throughput(gen_tokens, gen_s) / workers},
        "weight_sync": {"seconds": sync["seconds"], "buckets": sync["buckets"], "mib": sync["bytes"] / 2**20},
        "actor_logp": {"seconds": logp_s, "tokens_per_s_per_device": throughput(tokens, logp_s) / workers},
        "actor_update": {"seconds": update_s, "tokens_per_s_per_device": throughput(tokens, update_s) / workers,
                         "mfu": mfu(flops, update_s, peak_flops=peak, n_devices=workers) if peak else None},
        "step": {"seconds": step_s, "tokens_per_s_per_device": throughput(tokens, step_s) / workers},
    }


def headline(name: str, m: dict, *, per: str) -> list[str]:
    mfu_text = "n/a" if m["actor_update"]["mfu"] is None else f"{m['actor_update']['mfu']:.1%}"
    return [f"{name}, {m['workers']} worker(s): rollout {fmt(m['rollout']['tokens_per_s_per_device'], 'tok/s')}/{per}, "
            f"sync {fmt(m['weight_sync']['seconds'], 's')} ({m['weight_sync']['mib']:,.0f} MiB), actor update "
            f"{fmt(m['actor_update']['tokens_per_s_per_device'], 'tok/s')}/{per} (MFU {mfu_text})",
            f"step (rollout + logp + update + sync): {fmt(m['step']['tokens_per_s_per_device'], 'tok/s')}/{per} "
            f"vs EasyR1 {EASYR1['tokens_per_s_per_gpu']:,.0f}; actor MFU vs EasyR1 {EASYR1['actor_mfu']:.0%}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=[*sorted(TEXT), "tiny"], default="7b",
                   help="tiny: the embedded tiny VLM on CPU, a smoke run of the same code")
    p.add_argument("--workers", type=int, default=1, help="actor ranks = rollout replicas = GPUs used")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--response-tokens", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--memory-utilization", type=float, default=0.3, help="each engine's share of its GPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the GPU (default: by name)")
    p.add_argument("--scratch", default=None)
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)

    scratch = Path(args.scratch) if args.scratch else default_scratch()
    gpu = args.size != "tiny"
    if gpu:
        if not torch.cuda.is_available():
            raise SystemExit("bench.gpu_profile needs a CUDA GPU (torch.cuda.is_available() is False); "
                             "`--size tiny` runs the same code on CPU, the CPU set is `make bench`")
        if torch.cuda.device_count() < args.workers:
            raise SystemExit(f"--workers {args.workers} needs as many GPUs; {torch.cuda.device_count()} visible")
        device = torch.cuda.get_device_name(0)
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_for(device)
        if peak is None:
            raise SystemExit(f"unknown peak FLOP/s for {device!r}: pass --peak-tflops")
        model_dir = build_model(scratch / "models" / f"qwen2_5_vl_{args.size}", args.size, tiny_model(scratch))
        name = f"Qwen2.5-VL-{args.size.upper()} (random init) on {device}"
    else:
        device, peak = "cpu", (args.peak_tflops * 1e12 if args.peak_tflops else None)
        model_dir, name = tiny_model(scratch), "tiny Qwen2-VL on CPU"
    data = scratch / "data448"
    if not (data / "rl.jsonl").is_file():  # 448x448 images: 256 vision tokens each, like a real VQA prompt
        write_suite(data, seed=0, n=1, n_heldout=1, n_rl=max(args.prompts, 8), tasks=("counting",),
                    spec=SceneSpec(grid=4, cell=112, size=80))
    m = profile(model_dir, data, workers=args.workers, prompts=args.prompts, n=args.n,
                response_tokens=args.response_tokens, micro_batch_size=args.micro_batch_size, peak=peak, gpu=gpu,
                memory_utilization=args.memory_utilization)
    cfg = {k: getattr(args, k) for k in ("size", "workers", "prompts", "n", "response_tokens", "micro_batch_size")}
    ratios = {"tokens/s/GPU vs EasyR1": m["step"]["tokens_per_s_per_device"] / EASYR1["tokens_per_s_per_gpu"]}
    if m["actor_update"]["mfu"] is not None:
        ratios["actor MFU vs EasyR1"] = m["actor_update"]["mfu"] / EASYR1["actor_mfu"]
    result = {"config": {**cfg, "device": device, "peak_flops": peak}, "metrics": {"model": name, **m},
              "reference": EASYR1, "ratios": ratios, "headline": headline(name, m, per="GPU" if gpu else "process")}
    print(f"-> {write_result(f'gpu_profile_{args.size}_w{args.workers}', result, args.results_dir)}")
    print("\n".join(result["headline"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Supervised fine-tuning of a VLM on image/video + text chat records, loss on assistant tokens only.

A compact loop of our own rather than TRL's SFTTrainer: TRL's assistant-only loss needs
`{% generation %}` markers that real Qwen2/2.5-VL templates lack, and we want the same atomic
checkpoints and exact resume (data position, RNG, optimizer) as the RL trainer.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from model.inputs import IGNORE, encode_sft
from model.load import load_processor, load_vlm, write_vlm
from model.packing import forward_inputs
from records import VideoGeometry, load_media, load_records
from records.mixture import batch_indices, check_task_weights, weighted_records
from rewards.config import RewardConfig
from rewards.evaluate import eval_subset, format_table, judge, local_scorer, summarize, write_eval
from rewards.inputs import for_model
from rewards.pool import VerifierPool
from rollout.greedy import generate_greedy
from training.atomic import atomic_dir
from training.config import ConfigError, check_input
from training.distributed import FSDPConfig, all_reduce_floats, full_state_dict, is_sharded, shard_rows
from training.optim import OptimConfig
from training.placement import Handle, WorkerGroup, spawn, start_ray_once, stop_ray
from training.runlog import MetricsLog, latest_checkpoint, periodic, save_checkpoint, save_or_stop, start_run
from training.trainer import Trainer, device, set_threads


@dataclass(frozen=True)
class SFTConfig:
    model: str = "runs/tiny/model"        # HF folder of the starting model
    data: str = "runs/tiny/data/sft.jsonl"  # SFT records (last message is the assistant's)
    eval_data: str | None = None          # prompt records for held-out eval during/after training
    out: str = "runs/tiny/sft"            # run folder: checkpoints/, final/, metrics.jsonl, tb/
    steps: int = 1000                     # optimizer steps
    batch_size: int = 32                  # records per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer step
    optim: OptimConfig = field(default_factory=OptimConfig)
    save_every: int = 200                 # checkpoint period in steps (0: only at the end)
    keep_checkpoints: int = 2
    eval_every: int = 0                   # held-out eval period in steps (0: only at the end)
    eval_limit: int = 0                   # records used by periodic evals (0: all)
    eval_max_new_tokens: int = 48
    log_every: int = 10
    seed: int = 0
    max_minutes: float = 0.0              # stop (and save) after this wall time; 0: no limit
    dtype: Literal["float32", "bfloat16"] = "float32"
    task_weights: dict[str, int] = field(default_factory=dict)
    """Records of a task appear this many times per epoch (default 1): a slow-to-learn task
    (grounding) gets more of the batches without drawing more distinct examples."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward routes, as in an RL config: the tasks they route are the ones the data may hold,
    and the held-out eval scores with them (the training reward's mean and the verifiers' accuracy)."""
    workers: int = 1                      # ranks of an FSDP2 group (Ray actors) sharing each batch; 1: this process
    gpus_per_worker: float = 0.0          # GPUs per rank, on a GPU cluster
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    pack_sequences: bool = False          # each pass's rows as one row without padding (as `ppo.pack_sequences`)

    def __post_init__(self):
        check_task_weights(self.task_weights)   # at load time, with the config file's name
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")

    def check_inputs(self) -> None:
        """ConfigError naming the key of an input that is not set or does not exist."""
        check_input("model", self.model, kind="model")
        check_input("data", self.data, kind="data")
        check_input("eval_data", self.eval_data, kind="data", required=False)


def modality_groups(records, rows) -> list[list[int]]:
    """`rows` (indices into `records`) in two groups, those without videos, then those with (an empty
    group left out): a batch pads every row to its longest, and a video prompt is several image
    prompts long. Split a step's whole batch, before sharding it, so every rank makes the same passes.
    The loss is a token mean over the whole step, so the split changes the cost, not the result."""
    groups = ([i for i in rows if not records[i].videos], [i for i in rows if records[i].videos])
    return [g for g in groups if g]


def encode_records(processor, records, geometry: VideoGeometry) -> dict:
    """SFT inputs (`model.inputs.encode_sft`) of target records, images and videos loaded as every
    stage loads them (`records.load_media`)."""
    media = [load_media(r, r.messages, geometry=geometry) for r in records]
    return encode_sft(processor, [m.messages for m in media], [m.images for m in media], [m.videos for m in media])


def encode_by_modality(processor, records, geometry: VideoGeometry) -> list[dict]:
    """One SFT batch per modality group of `records` (see modality_groups)."""
    return [encode_records(processor, [records[i] for i in g], geometry)
            for g in modality_groups(records, range(len(records)))]


class SFTWorker(Trainer):
    """One rank of SFT: the model and its optimizer. `train_step(step)` trains on the rank's share
    of that step's records (the batch is a pure function of the step); every rank of a group runs
    it at once."""

    def __init__(self, cfg: SFTConfig):
        set_threads()
        torch.manual_seed(cfg.seed)
        self.cfg, self.device = cfg, device()
        self.records = weighted_records(load_records(cfg.data, tasks=cfg.reward.known_tasks, require="target"),
                                        cfg.task_weights)
        self.model, self.processor = load_vlm(cfg.model, dtype="float32", train=True, device=str(self.device))
        self.geometry = VideoGeometry.of(self.processor)
        self._setup(optim=cfg.optim, total_steps=cfg.steps, dtype=cfg.dtype, fsdp=cfg.fsdp)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step: the NLL of the assistant tokens, a token mean over the whole step
        (every micro-batch and rank divides its sum by the step's token count). Returns the summed
        NLL, the token count, the gradient norm and whether a non-finite loss skipped the step."""
        cfg = self.cfg
        micro = []
        for m in range(cfg.grad_accum):
            idx = batch_indices(len(self.records), step, m, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                seed=cfg.seed)
            # one pass per modality group of the micro-batch on every rank; a rank without records of
            # its own in a group (a group smaller than the world) pads with a pass that counts for nothing
            for rows in modality_groups(self.records, idx):
                mine = shard_rows(rows, rank=self.rank, world=self.world)
                recs = [self.records[i] for i in (mine or rows[:1])]
                micro.append((encode_records(self.processor, recs, self.geometry), bool(mine)))
        local = sum(int((b["labels"] != IGNORE).sum()) for b, real in micro if real)
        total_tok = int(all_reduce_floats({"tokens": local})["tokens"])
        nll_sum = 0.0
        for batch, real in micro:
            labels = batch.pop("labels").to(self.device)
            inputs, packing = forward_inputs(self.model, {k: v.to(self.device) for k, v in batch.items()},
                                             pack=cfg.pack_sequences)
            with self._autocast():
                logits = self.model(**inputs, use_cache=False).logits.float()
            if packing is None:
                logits, target = logits[:, :-1], labels[:, 1:]
            else:   # (1, N): the next token of each position's own sequence
                target = packing.next_tokens(packing.pack(labels))
            # Token-mean over the whole optimizer step (not per micro-batch): sum / total tokens; FSDP
            # averages the ranks' gradients, hence the count over the world size.
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                    ignore_index=IGNORE, reduction="sum")
            loss = nll / (max(1, total_tok) / self.world)
            (loss if real else loss * 0.0).backward()
            nll_sum += nll.detach().item() if real else 0.0
        nll_sum = all_reduce_floats({"nll": nll_sum})["nll"]
        if not math.isfinite(nll_sum):
            self.opt.zero_grad(set_to_none=True)
            return {"nll": nll_sum, "tokens": total_tok, "skipped": 1.0}
        return {"nll": nll_sum, "tokens": total_tok, "grad_norm": self._step(), "lr": self.sched.get_last_lr()[0],
                "skipped": 0.0}

    def greedy(self, records, max_new_tokens: int) -> list[str]:
        """Greedy answers to prompt records (every rank decodes its share, all return all)."""
        with self._autocast():
            return generate_greedy(self.model, self.processor, records, max_new_tokens=max_new_tokens)

    def export(self, path: str) -> None:
        """Write an HF folder of the current model (rank 0 writes; every rank must call it)."""
        sd = full_state_dict(self.model)
        if self.rank == 0:
            write_vlm(self.model, self.processor, path, state_dict=sd if is_sharded(self.model) else None)


def train_sft(cfg: SFTConfig, *, resume: bool = True, progress: bool = True) -> Path:
    """Run SFT; returns the folder of the final model (`out/final`). With `workers` > 1 the model is
    sharded over a group of Ray actors."""
    cfg.check_inputs()
    out = Path(cfg.out)
    tasks = cfg.reward.known_tasks
    load_records(cfg.data, tasks=tasks, require="target")   # a bad record stops the run before any worker starts
    eval_records = load_records(cfg.eval_data, tasks=tasks, require="prompt") if cfg.eval_data else []
    ckpt = latest_checkpoint(out) if resume else None
    own_ray = cfg.workers > 1 and start_ray_once()
    worker: Handle[SFTWorker] | WorkerGroup[SFTWorker] = spawn(
        SFTWorker, cfg, workers=cfg.workers, use_ray=cfg.workers > 1, num_gpus=cfg.gpus_per_worker)
    log = MetricsLog(out)
    step = start_run(out, ckpt, cfg, log, lambda c, state: worker.load_state(str(c / "model"), state["model"]).result())

    def checkpoint(at: int) -> None:
        save_checkpoint(out, at, lambda d: {"model": worker.save_state(str(d / "model")).result()},
                        keep=cfg.keep_checkpoints)

    # the held-out eval's verifiers run in their pool (timeouts), started on the first eval; they read
    # answers in the model family's conventions (grounding coordinates)
    pool: list[VerifierPool] = []
    reward_cfg = for_model(cfg.reward, load_processor(cfg.model))

    def run_eval(at: int, limit: int) -> tuple[dict, list]:
        recs = eval_subset(eval_records, limit)
        if not pool:
            pool.append(VerifierPool.from_config(cfg.reward.pool))
        responses = worker.greedy(recs, cfg.eval_max_new_tokens).result()
        gens = judge(recs, responses, reward_cfg, scorer=local_scorer(reward_cfg, pool=pool[0]))
        table = summarize(gens)
        log.log(at, {f"eval/{t}/{k}": v for t, row in table.items() for k, v in row.items()
                     if k != "n" and v is not None})
        return table, gens

    t_start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="sft", dynamic_ncols=True)
    tokens, losses = 0, []
    try:
        while step < cfg.steps:
            t0 = time.time()
            m = worker.train_step(step).result()
            if m["skipped"]:
                log.log(step, {"train/skipped_nonfinite": 1})
                step += 1
                continue
            step += 1
            tokens += int(m["tokens"])
            losses.append(m["nll"] / max(1, m["tokens"]))
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics = {"train/loss": sum(losses) / len(losses), "train/lr": m["lr"],
                           "train/grad_norm": m["grad_norm"], "train/step_s": time.time() - t0, "train/tokens": tokens}
                log.log(step, metrics)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
                losses = []
            if eval_records and periodic(step, cfg.eval_every) and step < cfg.steps:
                table, _ = run_eval(step, cfg.eval_limit)
                bar.write(format_table(table, f"step {step}"))
            if save_or_stop(step, steps=cfg.steps, save_every=cfg.save_every, t_start=t_start,
                            max_minutes=cfg.max_minutes, checkpoint=checkpoint, say=bar.write):
                break
        bar.close()
        final = atomic_dir(out / "final", lambda d: worker.export(str(d)).result())
        if eval_records:
            table, gens = run_eval(step, 0)
            write_eval(out / "eval.json", table, gens)
            print(format_table(table, f"held-out after SFT ({step} steps)"))
    finally:
        for p in pool:
            p.close()
        log.close()
        worker.kill()
        if own_ray:
            stop_ray()
    return final

"""Weight sync through vLLM's weight-update API (`rollout.sync_method: layerwise`, and `transfer` with
our gloo backend on CPU) against the reload path, on the tiny VLM with in-process engines."""
import importlib.util
import json

import pytest
import torch

from model.load import load_vlm, save_vlm
from model.lora import LoRAConfig, full_params
from rl.config import RLConfig, RolloutConfig
from rl.driver import fit
from rl.workers import PolicyWorker
from rollout import EngineConfig, make_engine
from rollout.sync import buckets
from rollout.types import SamplingConfig
from rollout.worker import RolloutWorker
from tests import rollout_checks as checks
from tests.test_rl import _cfg
from training.config import ConfigError, load_config
from training.distributed import free_port
from training.optim import OptimConfig
from training.placement import Handle, spawn

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]

SAMPLING = SamplingConfig(n=2, max_tokens=16, seed=7)


@pytest.fixture(scope="module")
def engines(tiny_model_dir, tmp_path_factory):
    """Two replicas that sync by transfer and one by layerwise (each can also take a reload: the
    extension is always there)."""
    cache = str(tmp_path_factory.mktemp("vllm-cache"))
    engs = {name: make_engine(str(tiny_model_dir), EngineConfig(backend="vllm", max_model_len=512, sync_method=method,
                                                               cache_root=cache), seed=0)
            for name, method in (("transfer", "transfer"), ("replica", "transfer"), ("layerwise", "layerwise"))}
    yield engs
    for e in engs.values():
        e.close()


def _perturb(model, *, seed: int, scale: float = 0.05, only: str = "") -> None:
    """A training-like change of every parameter (of those whose name holds `only`)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def _transfer(engines, state) -> None:
    """One sync of `state` to `engines` in one group, this process the sender."""
    from rollout import vllm_sync

    vllm_sync.send_weights(vllm_sync.ParamSource.of(state), vllm_sync.ReplicaClient.of(engines), rank=0,
                           address="127.0.0.1", port=free_port(), bucket_bytes=2**20, backend=vllm_sync.GLOO)


def _sync(engine, state) -> None:
    """A sync in 1 MiB buffers (transfer) or buckets of whole layers (layerwise), as the trainer's."""
    if engine.sync_method == "transfer":
        _transfer([engine], state)
        return
    for bucket in buckets(state.items(), 2**20):
        engine.load_weights(bucket)
    engine.finish_sync()


def _reload(engine, state) -> None:
    engine.llm.collective_rpc("vlrl_load_weights", args=(dict(state),))
    engine.finish_sync()


def _samples(out) -> list:
    return [(c.token_ids, c.logp) for g in out for c in g]


@pytest.mark.parametrize("method", ["layerwise", "transfer"])
def test_meets_the_sync_contract(engines, trainer, prompts, method):
    """The engine contract's sync check (vision-only change, every weight, the original back), with
    each `sync_weights` going through the method."""
    diffs = checks.check_sync(engines[method], *trainer, prompts)
    assert max(diffs.values()) < checks.LOGP_TOL


@pytest.mark.parametrize("method", ["layerwise", "transfer"])
def test_gives_what_reload_gives(engines, trainer, prompts, method):
    """After a training-like change, a sync in several buckets and a reload leave the engine with
    exactly the same samples and log-probs, which match the trainer's on the new weights."""
    eng, (model, processor) = engines[method], trainer
    before = _samples(eng.generate(prompts, SAMPLING))
    with checks.modified_weights(eng, model):
        _perturb(model, seed=1)
        _sync(eng, model.state_dict())
        synced = eng.generate(prompts, SAMPLING)
        _reload(eng, model.state_dict())
        assert _samples(synced) == _samples(eng.generate(prompts, SAMPLING)) != before
        assert checks.max_logp_diff(eng, model, processor, prompts, SAMPLING) < checks.LOGP_TOL


@pytest.mark.parametrize("method", ["layerwise", "transfer"])
def test_a_partial_sync_leaves_the_other_layers_intact(engines, trainer, prompts, method):
    """Only the first language-model layer is sent: the engine then runs the trainer's model with
    that layer changed and every other layer as it was."""
    eng, (model, processor) = engines[method], trainer
    before = _samples(eng.generate(prompts, SAMPLING))
    with checks.modified_weights(eng, model):
        _perturb(model, seed=2, only="language_model.layers.0.")
        part = {k: v for k, v in model.state_dict().items() if "language_model.layers.0." in k}
        assert 0 < len(part) < len(model.state_dict()) // 4
        _sync(eng, part)
        assert _samples(eng.generate(prompts, SAMPLING)) != before
        assert checks.max_logp_diff(eng, model, processor, prompts, SAMPLING) < checks.LOGP_TOL


def test_one_group_syncs_every_replica(engines, trainer, prompts):
    model, processor = trainer
    replicas = [engines["transfer"], engines["replica"]]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        _perturb(model, seed=3)
        _transfer(replicas, model.state_dict())
        a, b = (eng.generate(prompts, SAMPLING) for eng in replicas)
        assert _samples(a) == _samples(b)
        assert checks.max_logp_diff(replicas[1], model, processor, prompts, SAMPLING) < checks.LOGP_TOL
    finally:
        model.load_state_dict(original)
        _transfer(replicas, model.state_dict())


@pytest.mark.parametrize("method", ["layerwise", "transfer"])
def test_push_weights_of_a_lora_actor(trainer, tiny_model_dir, prompts, method):
    """`PolicyWorker.push_weights` sends the merged LoRA weights under the base names: the engine
    then matches the reload path's result and the merged model."""
    processor = trainer[1]
    actor = PolicyWorker(str(tiny_model_dir), optim=OptimConfig(), lora=LoRAConfig(r=4, alpha=8.0))
    with torch.no_grad():   # trained adapters: B is zero at init
        for name, p in actor.model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(4))
    cfg = EngineConfig(backend="vllm", max_model_len=512, sync_method=method)
    target = Handle(RolloutWorker, obj=RolloutWorker(str(tiny_model_dir), cfg))
    eng = target.obj.engine
    merged = dict(full_params(actor.model))
    try:
        out = actor.push_weights([target], bucket_mb=1.0, sync_method=method)
        assert out["failed"] == [] and out["bytes"] == sum(v.numel() * v.element_size() for v in merged.values())
        pushed = eng.generate(prompts, SAMPLING)
        _reload(eng, merged)
        assert _samples(eng.generate(prompts, SAMPLING)) == _samples(pushed)
        merged_model = load_vlm(tiny_model_dir)[0]
        merged_model.load_state_dict(merged)
        assert checks.max_logp_diff(eng, merged_model, processor, prompts, SAMPLING) < checks.LOGP_TOL
    finally:
        target.obj.close()


@pytest.mark.parametrize("method", ["reload", "layerwise", "transfer"])
def test_tied_embeddings_sync(tiny_model_dir, tmp_path, prompts, method):
    """A policy whose output head is its input embedding: a change of the embedding reaches both
    (the trainer's state dict holds the tensor under both names; vLLM loads it once)."""
    model, processor = load_vlm(tiny_model_dir)
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    save_vlm(model, processor, tmp_path / "tied")
    eng = make_engine(str(tmp_path / "tied"), EngineConfig(backend="vllm", max_model_len=512, sync_method=method))
    try:
        before = _samples(eng.generate(prompts, SAMPLING))
        _perturb(model, seed=5, only="embed_tokens")
        eng.sync_weights(model.state_dict())
        assert _samples(eng.generate(prompts, SAMPLING)) != before
        assert checks.max_logp_diff(eng, model, processor, prompts, SAMPLING) < checks.LOGP_TOL
    finally:
        eng.close()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["layerwise", "transfer"])
def test_an_engine_in_its_own_process(tiny_model_dir, prompts, method, monkeypatch):
    """A multiprocess engine (vLLM's engine core in a child process, which registers our backends
    when it imports the worker extension): the buckets go as safetensors bytes, or the broadcast
    reaches that process."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")   # restored afterwards for the other tests
    model, processor = load_vlm(tiny_model_dir)
    _perturb(model, seed=7)
    eng = make_engine(str(tiny_model_dir), EngineConfig(backend="vllm", max_model_len=512, sync_method=method,
                                                       in_process=False))
    try:
        assert not eng.in_process
        _sync(eng, model.state_dict())
        assert checks.max_logp_diff(eng, model, processor, prompts, SAMPLING) < checks.LOGP_TOL
    finally:
        eng.close()


@pytest.mark.ray
def test_a_sharded_actor_transfers_to_a_ray_replica(ray_cluster, tiny_model_dir, tmp_path, prompts):
    """Two FSDP2 ranks and the engine in Ray actors of their own: rank 0 broadcasts to the engine
    while rank 1 takes part in the gathers; the engine then runs the actor's weights."""
    model, processor = load_vlm(tiny_model_dir)
    _perturb(model, seed=6)
    save_vlm(model, processor, tmp_path / "policy")
    actor = spawn(PolicyWorker, str(tmp_path / "policy"), optim=OptimConfig(), workers=2, use_ray=True, timeout=600)
    cfg = EngineConfig(backend="vllm", max_model_len=512, sync_method="transfer", cache_root=str(tmp_path / "cache"))
    replica = spawn(RolloutWorker, str(tiny_model_dir), cfg, use_ray=True, timeout=600)
    try:
        before = replica.generate(prompts, SAMPLING).result()
        out = actor.push_weights([replica], bucket_mb=1.0, sync_method="transfer").result()
        assert out["failed"] == [] and out["bytes"] == sum(v.numel() * v.element_size()
                                                           for v in model.state_dict().values())
        after = replica.generate(prompts, SAMPLING).result()
        assert _samples(after) != _samples(before)
        gap = (checks.trainer_logp(model, processor, prompts, after) - checks.flat_logp(after)).abs().max().item()
        assert gap < checks.LOGP_TOL
    finally:
        actor.kill()
        replica.kill()


@pytest.mark.slow
def test_rl_runs_end_alike_by_every_sync_method(tmp_path, sft_run, monkeypatch):
    """Two RL steps with an in-process vLLM engine, syncing by reload, layerwise or transfer: the
    same rollouts, metrics and final weights."""
    from rollout import vllm_sync

    sends = []
    real = vllm_sync.send_weights
    monkeypatch.setattr(vllm_sync, "send_weights", lambda *a, **k: (sends.append(1), real(*a, **k))[1])
    runs = {}
    for method in ("reload", "layerwise", "transfer"):
        ro = RolloutConfig(backend="vllm", n=2, max_tokens=24, max_model_len=512, sync_method=method,
                           cache_root=str(tmp_path / "vllm-cache"))
        final = fit(_cfg(sft_run, tmp_path / method, rollout=ro, save_every=0), progress=False)
        rows = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
        runs[method] = (load_vlm(final)[0].state_dict(), rows)
    w_reload, m_reload = runs["reload"]
    assert len(sends) == len(runs["transfer"][1]) == 2   # one sync per step, through the transfer path
    for method in ("layerwise", "transfer"):
        weights, rows = runs[method]
        assert [r["step"] for r in rows] == [1, 2]
        for a, b in zip(m_reload, rows):
            for key in ("reward/counting/total", "actor/loss", "critic/loss", "response/length_mean", "sync/mib"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (method, key)
        assert max((w_reload[k] - weights[k]).abs().max().item() for k in w_reload) < 1e-5, method


def test_sync_method_is_checked_at_load_time():
    assert load_config(RLConfig, None, ["rollout.sync_method=transfer"]).rollout.sync_method == "transfer"
    message = r"rollout.sync_method: 'copy' is not one of \['reload', 'layerwise', 'transfer'\]"
    with pytest.raises(ConfigError, match=message):
        load_config(RLConfig, None, ["rollout.sync_method=copy"])
    colocated = ["rollout.sync_method=transfer", "ray.placement=colocated", "ray.actor_gpus=1", "ray.rollout_gpus=1"]
    with pytest.raises(ConfigError, match="rollout.sync_method: 'transfer' .* use ray.placement split"):
        load_config(RLConfig, None, colocated)
    assert load_config(RLConfig, None, colocated[1:]).rollout.sync_method == "layerwise"
    assert load_config(RLConfig, None, colocated[:2]).ray.placement == "colocated"   # no GPUs: no NCCL

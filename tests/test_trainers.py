"""The backend where users train: transformers' ``Trainer`` (``examples/hf_trainer.py``).

* ``TrainingArguments(torch_compile_backend="domino")`` does not reach the backend: accelerate
  (which Trainer hands the name to) accepts only its own ``DynamoBackend`` names. Pinned here so
  that the day accelerate accepts registered backends, this test says so and the example can
  switch to it.
* The example's route, ``model.compile(backend="domino")`` then ``Trainer``, trains a tiny
  Qwen3-MoE with the aux loss on: the loss of every step equals the same Trainer run without
  compile, the trained weights too, and the backend's reports say what each pass did on one
  process (no all-to-all: Domino's trigger is absent; transformers 5's aux loss is already a
  per-layer loop: nothing stacked to rewrite, skipped with that reason; the router logits the
  forward returns go to the host).
* torchtitan 0.3.0's own compile hook, ``torchtitan.distributed.compile.apply_compile`` with
  ``CompileConfig(backend="domino")`` (each ``TransformerBlock`` compiled on its own,
  ``fullgraph=True``), on torchtitan's Qwen3-MoE model (a tiny config built here with its own
  ``_build_qwen3_moe_layers``; attention swapped to SDPA with torchtitan's own test helper
  ``build_decoder_config_for_backend(..., "sdpa")``: its flex and varlen attention cannot run a
  backward on CPU), experts sharded over 2 gloo ranks and wired by ``RoutedExperts.parallelize``
  as in ``tests/titan_fixtures.py``: loss and every gradient equal its eager run, and Domino
  chunks the MoE region of the (one, shared) block graph. torchtitan's trainer itself does not
  run on CPU (see the README's "Trainers").
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import SharedRun

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import hf_trainer  # noqa: E402

#: The 2-rank runs' shared process group (``two_ranks``): its three runs had 1200, 900 and 1500 s apart.
TWO_RANKS_TIMEOUT_S = 2400


def test_trainer_backend_name_is_rejected_by_accelerate() -> None:
    model = hf_trainer.tiny_qwen3_moe()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(output_dir=out, max_steps=1, use_cpu=True, report_to=[],
                                              torch_compile=True, torch_compile_backend="domino")
        with pytest.raises(ValueError, match="'DOMINO' is not a valid DynamoBackend"):
            transformers.Trainer(model=model, args=args, train_dataset=hf_trainer.Synthetic(2))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_hf_trainer_domino_equals_eager() -> None:
    from moe_passes.inductor.backend import domino_backend

    steps = 3
    eager = hf_trainer.train(steps, compile=False)
    torch._dynamo.reset()
    domino_backend.clear_reports()
    compiled = hf_trainer.train(steps, compile=True, backend="domino")

    assert len(eager["losses"]) == len(compiled["losses"]) == steps
    for i, (e, c) in enumerate(zip(eager["losses"], compiled["losses"]), 1):
        assert abs(c - e) <= 1e-5 * abs(e), f"step {i}: compiled loss {c} vs eager {e}"
    ref = dict(eager["model"].named_parameters())
    for name, p in compiled["model"].named_parameters():
        torch.testing.assert_close(p.detach(), ref[name].detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    # Trainer really ran the model through the entry point's backend object
    s = domino_backend.summary()
    d = s.as_dict()
    print(s)
    assert d["graphs"] >= 1, "the domino backend compiled nothing: Trainer did not route through it"
    assert not d["canonical_errors"], d["canonical_errors"]
    passes = d["passes"]
    assert all(p["failed"] == 0 for p in passes.values()), passes
    # aux loss: transformers 5's load_balancing_loss_func is a per-layer loop; nothing stacked
    aux = passes["layerwise_aux_loss"]
    assert aux["applied"] == 0 and d["layerwise_aux_loss"]["layers_rewritten"] == 0
    assert any("already per layer" in r for r in aux["skip_reasons"]), aux
    # Domino: one process, no all-to-all
    assert d["domino_ep"]["regions_chunked"] == 0 and passes["domino_ep"]["applied"] == 0
    assert d["schedule_overlap"]["all_to_alls"] == 0
    # offload: the router logits of both layers the forward returns
    assert d["async_offload"]["router_tensors_offloaded"] == hf_trainer.LAYERS


# torchtitan Qwen3-MoE, tiny: experts, dim, head dim, vocab, layers, batch, sequence
T_E, T_DIM, T_HD, T_V, T_L, T_B, T_S = 4, 16, 8, 64, 2, 2, 8
# eager vs compiled: the experts' bf16 grouped GEMMs round differently once Inductor fuses around
# them (tests/test_torchtitan_domino.py measures eager vs plain Inductor at up to 0.022 of the
# tensor's scale); the bound is theirs, eight bf16 ulps of the scale.
T_GRAD_RTOL = 2.0**-5


def _titan_qwen3_config(ep: int) -> Any:
    from torchtitan.experiments.graph_trainer.common_utils import build_decoder_config_for_backend
    from torchtitan.models.common import Embedding, Linear
    from torchtitan.models.common.rope import CosSinRoPE
    from torchtitan.models.qwen3 import _EMBEDDING_INIT, _LINEAR_INIT, _build_qwen3_moe_layers, _qwen3_norm
    from torchtitan.models.qwen3.model import Qwen3Model

    def builder(attn_backend: str) -> Any:
        return Qwen3Model.Config(
            vocab_size=T_V, dim=T_DIM, norm=_qwen3_norm(T_DIM),
            tok_embeddings=Embedding.Config(num_embeddings=T_V, embedding_dim=T_DIM, param_init=_EMBEDDING_INIT),
            lm_head=Linear.Config(in_features=T_DIM, out_features=T_V, param_init=_LINEAR_INIT),
            layers=_build_qwen3_moe_layers(
                n_layers=T_L, dim=T_DIM, n_heads=2, n_kv_heads=1, head_dim=T_HD, moe_hidden_dim=8, num_experts=T_E,
                top_k=2, attn_backend=attn_backend, moe_comm_backend="standard",
                rope=CosSinRoPE.Config(dim=T_HD, max_seq_len=64, theta=1e6)),
        )

    cfg = build_decoder_config_for_backend(builder, "sdpa")
    for layer in cfg.layers:  # each rank builds only its experts (as tests/titan_fixtures.py does)
        layer.moe.routed_experts.inner_experts.num_experts = T_E // ep
    return cfg


def _titan_rank(rank: int, world: int) -> dict[str, Any]:
    from torchtitan.config import CompileConfig
    from torchtitan.distributed.compile import apply_compile
    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.distributed.utils import set_spmd_backend

    from moe_passes.inductor.backend import domino_backend

    # The post-grad schedule's report exists only when Inductor compiles; a graph served from the FX cache
    # (a second run of this test) has none, and the schedule assertion below would read 0.
    torch._inductor.config.fx_graph_cache = False
    set_spmd_backend("partial_dtensor")
    torch.manual_seed(0)
    full = _titan_qwen3_config(1).build()  # the same global weights on every rank
    model = _titan_qwen3_config(world).build()
    el = T_E // world
    model.load_state_dict({k: v[rank * el:(rank + 1) * el].clone() if ".inner_experts." in k else v
                           for k, v in full.state_dict().items()})
    pd = ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=world, world_size=world,
                      spmd_backend="partial_dtensor")
    for layer in model.layers.children():
        layer.moe.routed_experts.parallelize(pd)
    model.train()
    g = torch.Generator().manual_seed(100 + rank)
    ids, labels = torch.randint(0, T_V, (T_B, T_S), generator=g), torch.randint(0, T_V, (T_B, T_S), generator=g)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1).float(), labels.flatten())
        loss.backward()
        return loss.detach().clone(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = step()
    domino_backend.clear_reports()
    apply_compile(model, compile_config=CompileConfig(enable=True, backend="domino"), parallel_dims=pd)
    compiled = [step(), step()]  # the second step reuses the graph
    return {"eager": eager, "compiled": compiled, "summary": domino_backend.summary().as_dict(),
            "text": str(domino_backend.summary()), "params": [n for n, _ in model.named_parameters()]}


@pytest.mark.slow
@pytest.mark.timeout(TWO_RANKS_TIMEOUT_S + 300)  # the first of the 2-rank tests to run pays for all three runs
def test_torchtitan_apply_compile_domino_two_ranks() -> None:
    pytest.importorskip("torchtitan")
    per_rank = two_ranks().result("titan")
    print(per_rank[0]["text"])
    for rank, out in enumerate(per_rank):
        (l0, g0) = out["eager"]
        assert set(g0) == set(out["params"]), "eager: a parameter without a gradient"
        for l1, g1 in out["compiled"]:
            assert abs(float(l1) - float(l0)) <= 1e-5 * abs(float(l0)), f"rank {rank}: loss {float(l1)} vs eager {float(l0)}"
            assert set(g1) == set(g0)
            for n, r in g0.items():
                err = float((g1[n] - r).abs().max()) / max(float(r.abs().max()), 1e-6)
                assert err <= T_GRAD_RTOL, f"rank {rank}: gradient of {n}: {err:.3g} of its scale vs eager"
        d = out["summary"]
        # apply_compile compiles each block; both blocks share one graph (params are graph inputs)
        assert d["graphs"] == 1, out["text"]
        assert not d["canonical_errors"] and all(p["failed"] == 0 for p in d["passes"].values()), out["text"]
        assert d["domino_ep"]["regions_chunked"] == 1 and d["passes"]["domino_ep"]["applied"] == 1, out["text"]
        # torchtitan balances experts with a bias update outside the loss: no aux loss in the graph
        assert d["layerwise_aux_loss"]["layers_rewritten"] == 0
        assert d["schedule_overlap"]["all_to_alls"] > 0


def _hf_ep_rank(rank: int, world: int, path: str, compile: bool) -> dict[str, Any]:
    """transformers' own EP (all_to_all) + FSDP2 from ``from_pretrained``, trained by ``Trainer`` on this rank. The
    launcher variables it sets for transformers are restored afterwards: the rank process runs torchtitan's run
    next (``two_ranks``), whose ``init_device_mesh`` would read ``LOCAL_RANK`` as a launcher's and set a CUDA
    device."""
    import os

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    try:
        return _hf_ep_rank_run(rank, world, path, compile)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hf_ep_rank_run(rank: int, world: int, path: str, compile: bool) -> dict[str, Any]:
    import os

    from transformers.distributed import DistributedConfig

    from moe_passes.integrations.transformers_ep import register

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    # eager: transformers' own implementation; compiled: the same exchange without the graph break between
    # dispatch and combine (moe_passes.integrations.transformers_ep)
    implementation = register() if compile else "all_to_all"
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(ep_size=world, fsdp_size=world, ep_implementation=implementation))
    out: dict[str, Any] = {}
    if compile:
        from moe_passes.inductor.backend import domino_backend

        torch._dynamo.config.capture_scalar_outputs = True  # the EP dispatch's split sizes come from .tolist()
        domino_backend.clear_reports()
        model.compile(backend="domino")
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
            disable_tqdm=True)
        trainer = hf_trainer.RecordingTrainer(model=model, args=args, train_dataset=hf_trainer.Synthetic(2 * 2 * world))
        trainer.train()
    out["losses"] = trainer.step_losses
    if compile:
        out["summary"] = domino_backend.summary().as_dict()
        out["text"] = str(domino_backend.summary())
    return out


@pytest.mark.slow
@pytest.mark.timeout(TWO_RANKS_TIMEOUT_S + 300)
def test_hf_trainer_native_ep_fsdp2_domino_two_ranks() -> None:
    """Trainer + transformers' native EP + FSDP2, 2 gloo ranks, compiled with ``domino`` (the exchange in one
    graph: ``ep_implementation=moe_passes.integrations.transformers_ep.register()``): every step's loss equals
    the eager Trainer run with transformers' own ``"all_to_all"`` on every rank, and Domino chunks the
    experts graph of each layer (router outside it: ids and weights arrive as token-row inputs)."""
    eager, compiled = two_ranks().result("hf_ep/eager"), two_ranks().result("hf_ep/compiled")
    print(compiled[0]["text"])
    for rank, (e, c) in enumerate(zip(eager, compiled)):
        assert len(e["losses"]) == len(c["losses"]) == 2
        for i, (le, lc) in enumerate(zip(e["losses"], c["losses"]), 1):
            assert abs(lc - le) <= 1e-5 * abs(le), f"rank {rank} step {i}: compiled {lc} vs eager {le}"
        d = c["summary"]
        assert d["graphs"] >= 1 and not d["canonical_errors"], c["text"]
        assert all(p["failed"] == 0 for p in d["passes"].values()), c["text"]
        assert d["domino_ep"]["regions_chunked"] > 0 and not d["passes"]["domino_ep"]["skip_reasons"], c["text"]


# ------------------------------------------------------------------ the 2-rank runs, one process group

_TWO_RANKS: list[SharedRun] = []


def two_ranks() -> SharedRun:
    """The 2-rank tests' runs in one process group (``tests.distributed.SharedRun``: each rank pays its start-up,
    transformers' import and Dynamo's first compile once), each read by its own test. transformers' eager and
    compiled Trainer runs first; torchtitan's last (it switches Inductor's FX-graph cache off and sets torchtitan's
    SPMD backend for the rest of the process), and only where torchtitan is installed (its test skips otherwise).
    The two 2-rank tests alone, cold Inductor cache, 2-core machine, back to back at load 2: 114 s wall / 174 s
    user+sys as three process groups -> 76 s / 113 s as one."""
    if not _TWO_RANKS:
        import importlib.util

        path = tempfile.mkdtemp(prefix="trainers_hf_ep_")  # saved here: off rank 0 save_pretrained writes nothing
        atexit.register(shutil.rmtree, path, True)
        hf_trainer.tiny_qwen3_moe().save_pretrained(path)
        parts: dict[str, tuple[Any, tuple]] = {"hf_ep/eager": (_hf_ep_rank, (path, False)),
                                               "hf_ep/compiled": (_hf_ep_rank, (path, True))}
        if importlib.util.find_spec("torchtitan") is not None:
            parts["titan"] = (_titan_rank, ())
        _TWO_RANKS.append(SharedRun(2, parts, timeout_s=TWO_RANKS_TIMEOUT_S))
    return _TWO_RANKS[0]

"""Whole-layer Domino (``domino_mode="layer"``): micro-batches of whole sequences through whole decoder layers.

What the mode promises, on the reference model as written (attention with SDPA, M-RoPE rotary tables
computed outside the layers, a causal mask, RMSNorms, the MoE block with its all-to-all pair):
every decoder layer is one region starting at its input ``[B, S, H]``, consecutive layers run chunk to
chunk (no concatenation between them), rotary tables and the mask are read per micro-batch, and loss
and every gradient equal the eager model on real gloo ranks. Where the batch cannot be split (one
sequence per rank) the regions keep token chunks and the report says why.

The 2-rank slow tests (empty micro-batches, per-layer compile, torchtitan's MoE whole and per block) share
one process group (``two_ranks``); each reads its own run. Those four tests alone, cold Inductor cache,
2-core machine, back to back at load 2: 87 s wall / 160 s user+sys as four process groups -> 75 s / 140 s.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from moe_passes.config import BackendConfig
from moe_passes.fx.domino import DominoEPPass
from moe_passes.ir.facts import is_all_to_all
from moe_passes.testing import run_pass
from tests.distributed import SharedRun, fake_group, run_distributed
from tests.domino_helpers import capture_without_running
from tests.model_inputs import make_batch

aten = torch.ops.aten
LOSS_TOL, GRAD_TOL = 1e-5, 1e-5
#: The 2-rank slow tests' shared run (``two_ranks``): its four runs had 400 s each apart.
TWO_RANKS_TIMEOUT_S = 1600


def _model_graph(group: dist.ProcessGroup, batch: int, seq_len: int = 8) -> tuple[torch.fx.GraphModule, Any]:
    from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration

    cfg = InternS1VLConfig.tiny()
    torch.manual_seed(0)
    model = InternS1VLForConditionalGeneration(cfg, ep_group=group)
    b = make_batch(cfg, 0, batch=batch, seq_len=seq_len)
    (gm,) = capture_without_running(lambda ids, lab: model(input_ids=ids, labels=lab).loss, b["input_ids"], b["labels"])
    return gm, cfg


def _layer_pass(gm: torch.fx.GraphModule, num_chunks: int = 2) -> Any:
    return run_pass(DominoEPPass(BackendConfig(num_chunks=num_chunks, domino_mode="layer")), gm)


def test_every_decoder_layer_is_one_region_and_layers_join_chunk_to_chunk() -> None:
    with fake_group(2) as group:
        gm, _ = _model_graph(group, batch=2)
        result = _layer_pass(gm)
    assert result.changed and result.error is None
    modes = result.stats["modes"]
    assert len(modes) == 2 and all(m.startswith("layer: ") for m in modes.values()), modes
    assert result.stats["joined"] == [list(modes)[1]], "layer 1 must read layer 0's chunks directly"
    # the attention of each layer is chunked: one SDPA per micro-batch and layer, on its own sequences
    sdpa = [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 2 * 2 and {n.meta.get("domino_chunk") for n in sdpa} == {0, 1}
    assert all(n.meta["val"].shape[0] == 1 for n in sdpa)
    # no concatenation of the residual stream between the layers: layer 1's chunk k reads layer 0's chunk k
    last = [n for n in sdpa if n.meta["domino_chunk"] == 0][-1]
    seen, todo = set(), [last]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    cats = [n.name for n in seen if n.target is aten.cat.default and (len(n.args) < 2 or n.args[1] == 0)
            and n.meta["val"].shape[0] == 2]
    assert not cats, f"layer 1's first micro-batch waits for a concatenation of both: {cats}"
    # every micro-batch issues its own all-to-alls (counts, dispatch, combine) in each layer
    assert sum(is_all_to_all(n) for n in gm.graph.nodes) == 2 * 2 * 3


def test_one_sequence_per_rank_keeps_token_chunks_and_says_why() -> None:
    with fake_group(2) as group:
        gm, _ = _model_graph(group, batch=1)
        result = _layer_pass(gm)
    assert result.changed
    for why in result.stats["modes"].values():
        assert why.startswith("moe (token chunks): one sequence per rank"), why


def test_checkpointed_layers_keep_token_chunks_and_say_why() -> None:
    """Under activation checkpointing whole-layer mode steps back (a torch 2.13 Inductor bug in the recomputed
    backward with a symbolic batch, see ``fx/domino/layers.py``): decided from the program, so every rank agrees."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration

    with fake_group(2) as group:
        cfg = InternS1VLConfig.tiny()
        torch.manual_seed(0)
        model = InternS1VLForConditionalGeneration(cfg, ep_group=group)
        layers = model.model.language_model.layers
        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i])
        b = make_batch(cfg, 0, batch=2, seq_len=8)
        (gm,) = capture_without_running(lambda ids, lab: model(input_ids=ids, labels=lab).loss, b["input_ids"], b["labels"])
        result = _layer_pass(gm)
    assert result.changed
    for why in result.stats["modes"].values():
        assert why.startswith("moe (token chunks): activation checkpointing"), why


def test_moe_mode_is_unchanged_by_default() -> None:
    with fake_group(2) as group:
        gm, _ = _model_graph(group, batch=2)
        result = run_pass(DominoEPPass(BackendConfig(num_chunks=2)), gm)
    assert result.changed and "modes" not in result.stats
    assert all(n.meta["val"].shape[0] == 2 for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default)


def test_domino_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="domino_mode must be 'moe' or 'layer'"):
        BackendConfig(domino_mode="layers")


# ------------------------------------------------------------------ real ranks


def _loss_and_grads(model: torch.nn.Module, fn: Any, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def layers_worker(rank: int, world_size: int, lowering: str, shapes: list[tuple[int, int]],
                  modes: tuple[str, ...] = ("whole",), num_chunks: int = 2) -> dict[str, Any]:
    torch._dynamo.config.capture_scalar_outputs = True
    out = {}
    for mode in modes:
        torch._dynamo.reset()
        out[mode] = _layers_run(rank, lowering, shapes, mode, num_chunks)
    return out


def _layers_run(rank: int, lowering: str, shapes: list[tuple[int, int]], mode: str, num_chunks: int) -> dict[str, Any]:
    from moe_passes import make_backend
    from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration, load_hf_state_dict
    from moe_passes.regional import compile_regions

    config = InternS1VLConfig.tiny()
    torch.manual_seed(0)
    full_sd = InternS1VLForConditionalGeneration(config).state_dict()
    eager, model = (InternS1VLForConditionalGeneration(config, ep_group=dist.group.WORLD) for _ in range(2))
    for m in (eager, model):
        load_hf_state_dict(m, full_sd)
    backend = make_backend(passes=("domino_ep",), num_chunks=num_chunks, domino_mode="layer", lowering=lowering)
    if mode == "whole":
        compiled: Any = torch.compile(model, backend=backend)
    else:  # each decoder layer compiled on its own: x, rotary tables and mask enter as graph inputs
        compile_regions(model, backend)
        compiled = model
    worst = {"loss_err": 0.0, "grad_err": 0.0, "grad_scale": 0.0, "grads": 0}
    for step, (batch_size, length) in enumerate(shapes):
        batch = make_batch(config, seed=100 * step + rank, batch=batch_size, seq_len=length, pad=True)
        ref_loss, ref_grads = _loss_and_grads(eager, eager, batch)
        loss, grads = _loss_and_grads(model, compiled, batch)
        worst["loss_err"] = max(worst["loss_err"], abs(loss - ref_loss))
        assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
        for name, ref in ref_grads.items():
            worst["grad_err"] = max(worst["grad_err"], (grads[name] - ref).abs().max().item())
            worst["grad_scale"] = max(worst["grad_scale"], ref.abs().max().item())
            worst["grads"] += 1
    domino = [r for g in backend.reports for r in g["pre_grad"] if r["name"] == "domino_ep"]
    modes = [r["stats"].get("modes", {}) for r in domino]
    return {**worst, "modes": modes, "symbolic": sum("symbolic" in r["stats"] for r in domino)}


def _check(results: list[dict[str, Any]]) -> None:
    for rank, by_mode in enumerate(results):
        for mode, r in by_mode.items():
            _check_one(f"rank {rank} {mode}", r)


def _check_one(rank: str, r: dict[str, Any]) -> None:
    assert r["modes"] and all(m.startswith("layer: ") for ms in r["modes"] for m in ms.values()), (rank, r["modes"])
    assert r["loss_err"] <= LOSS_TOL, (rank, r)
    assert r["grad_err"] <= GRAD_TOL * max(1.0, r["grad_scale"]), (rank, r)
    assert r["grads"] > 0
    # torchtitan's bf16 experts (tests/test_torchtitan_domino.py): four bf16 ulps of the tensor's scale
    assert r.get("bf16_rel_err", 0.0) <= 2.0**-6, (rank, r)


def test_whole_layer_micro_batches_equal_eager_on_two_ranks() -> None:
    """Padded batches of 3 sequences (not divisible by 2 micro-batches), then 2 longer ones (a recompile with
    symbolic batch and length), whole-model compile: loss and every gradient equal eager (AOTAutograd's
    backward of the chunked layers; per-layer compile and Inductor in the slow tests)."""
    results = run_distributed(layers_worker, 2, "aot_eager", [(3, 8), (2, 12)], ("whole",), timeout_s=400)
    _check(results)
    # the recompile after the first step has a symbolic batch and length: chunk sizes are SymInt expressions
    assert all(r["symbolic"] >= 1 for by_mode in results for r in by_mode.values()), results


@pytest.mark.slow
@pytest.mark.timeout(TWO_RANKS_TIMEOUT_S + 300)  # the first of the 2-rank slow tests to run pays for all four runs
def test_fewer_sequences_than_micro_batches_leave_empty_micro_batches_and_stay_exact() -> None:
    """N = 4 over 2 and 3 sequences: the last micro-batches are empty (N never depends on one rank's batch)
    and still issue their collectives; views with -1 are spelled out, so an empty chunk reshapes."""
    _check(two_ranks().result("fewer_sequences"))


@pytest.mark.slow
@pytest.mark.timeout(TWO_RANKS_TIMEOUT_S + 300)
def test_whole_layer_micro_batches_equal_eager_per_layer_compile_on_two_ranks() -> None:
    """As above with each decoder layer compiled on its own (rotary tables and mask enter as graph inputs, read
    per micro-batch) and a third shape (~2 min on 2 loaded cores: slow, to keep the default suite short)."""
    results = two_ranks().result("per_layer")
    _check(results)
    assert all(r["symbolic"] >= 1 for by_mode in results for r in by_mode.values()), results


@pytest.mark.slow
def test_whole_layer_micro_batches_equal_eager_with_inductor_on_four_ranks() -> None:
    """Inductor with the post-grad overlap schedule, 4 ranks (one compile per rank: ~2 min on 2 cores)."""
    _check(run_distributed(layers_worker, 4, "inductor", [(2, 8)], timeout_s=600))


# ------------------------------------------------------------------ torchtitan's MoE in a decoder layer of our own


class _TitanDecoderLayer(torch.nn.Module):
    """x + attn(rms_norm(x)) then x + torchtitan MoE(rms_norm(x)): causal SDPA over [B, heads, S, d]."""

    heads = 2

    def __init__(self, block: torch.nn.Module, dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.block = block
        self.qkv = torch.nn.Parameter(torch.randn(3 * dim, dim, generator=g) / dim**0.5)
        self.out = torch.nn.Parameter(torch.randn(dim, dim, generator=g) / dim**0.5)
        self.attn_norm = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        h = torch.nn.functional.rms_norm(x, (D,), self.attn_norm)
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (h @ self.qkv.t()).chunk(3, dim=-1))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.transpose(1, 2).reshape(B, S, D) @ self.out.t()
        return self.block(x)


def titan_layers_worker(rank: int, world_size: int, per_block: bool) -> dict[str, Any]:
    from moe_passes import make_backend
    from tests import titan_fixtures as tf

    torch._dynamo.config.capture_scalar_outputs = True
    cfg = tf.TitanConfig(batch=3, seq=6)
    models = []
    for _ in range(2):
        m = tf.build_titan_model(rank, world_size, cfg)
        m.blocks = torch.nn.ModuleList(_TitanDecoderLayer(b, cfg.dim, seed=i) for i, b in enumerate(m.blocks))
        models.append(m)
    eager, model = models
    backend = make_backend(passes=("domino_ep",), num_chunks=2, domino_mode="layer", lowering="aot_eager")
    compiled = tf.compile_titan(model, backend, per_block)
    worst = {"loss_err": 0.0, "grad_err": 0.0, "grad_scale": 0.0, "grads": 0}
    for s in range(2):
        x, target = tf.titan_inputs(rank, cfg, step=s)
        ref_loss, ref_grads = tf.step(eager, eager, x, target)
        loss, grads = tf.step(compiled, model, x, target)
        worst["loss_err"] = max(worst["loss_err"], (loss - ref_loss).abs().item())
        for name, ref in ref_grads.items():
            err = (grads[name] - ref).abs().max().item()
            if ".inner_experts." in name:  # bf16 grouped GEMMs: sums of bf16 partials over other row splits
                rel = err / max(ref.abs().max().item(), 1e-6)
                worst["bf16_rel_err"] = max(worst.get("bf16_rel_err", 0.0), rel)
                continue
            if err > worst["grad_err"]:
                worst["grad_err"], worst["worst_grad"] = err, name
            worst["grad_scale"] = max(worst["grad_scale"], ref.abs().max().item())
            worst["grads"] += 1
    modes = [r["stats"].get("modes", {}) for g in backend.reports for r in g["pre_grad"] if r["name"] == "domino_ep"]
    return {"run": {**worst, "modes": modes}}


@pytest.mark.slow
@pytest.mark.timeout(TWO_RANKS_TIMEOUT_S + 300)
@pytest.mark.parametrize("per_block", [False, True], ids=["whole", "per_block"])
def test_torchtitan_moe_in_a_decoder_layer_runs_in_whole_layer_micro_batches(per_block: bool) -> None:
    """torchtitan 0.3.0's MoE (its router, all-to-all dispatcher, grouped experts, expert counters) under an
    attention of our own: every layer chunked as whole sequences, loss and every gradient equal eager."""
    pytest.importorskip("torchtitan", reason="torchtitan is in the test extras; without it there is no MoE to test")
    _check(two_ranks().result(f"titan/{'per_block' if per_block else 'whole'}"))


# ------------------------------------------------------------------ the 2-rank slow runs, one process group

_TWO_RANKS: list[SharedRun] = []


def two_ranks() -> SharedRun:
    """The 2-rank slow tests' runs in one process group (``tests.distributed.SharedRun``: each rank pays its
    start-up and Dynamo's first compile once), each run read by its own test; the torchtitan runs only where
    torchtitan is installed (their tests skip otherwise)."""
    if not _TWO_RANKS:
        import importlib.util

        parts: dict[str, tuple[Any, tuple]] = {
            "fewer_sequences": (layers_worker, ("aot_eager", [(2, 8), (3, 9)], ("whole",), 4)),
            "per_layer": (layers_worker, ("aot_eager", [(3, 8), (2, 12), (5, 7)], ("regional",))),
        }
        if importlib.util.find_spec("torchtitan") is not None:
            parts |= {"titan/whole": (titan_layers_worker, (False,)), "titan/per_block": (titan_layers_worker, (True,))}
        _TWO_RANKS.append(SharedRun(2, parts, timeout_s=TWO_RANKS_TIMEOUT_S))
    return _TWO_RANKS[0]

"""Expert-load logging and routing replay from host copies of the router outputs, on 2 CPU ranks (gloo).

    python examples/routing_replay.py                       # async_offload only (quickest compile)
    python examples/routing_replay.py --backend domino      # the full default pipeline
    python examples/routing_replay.py --steps 3 --record routing.pt

The tiny InternS1-VL MoE model trains a few steps with experts sharded over
both ranks, run the way users run it: ``model(..., output_router_logits=True)``.
The ``async_offload`` pass hands every layer's routing decisions (selected
experts) and router logits to the host: each copy starts right after the
router produced the tensor (on CUDA: on a side stream, into pinned memory)
and the step returns host tensors, so the logging below never issues a
blocking device-to-host copy. The returned logits keep their gradient (the
model's aux/z losses are inside the graph; a loss term on the returned logits
would still backpropagate), the selected experts stay on the device for
``topk``'s backward.

Each step, rank 0 prints every layer's expert-load histogram (token copies
routed to each expert, summed over both ranks) and the mean top-1 router
probability; every rank records its routing decisions for replay. At the end
the recording is checked: the step-1 weights run eagerly on the step-1 batch
must route every token exactly as recorded.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration, load_hf_state_dict  # noqa: E402
from moe_passes.models.interns1_vl.hf_loading import is_expert_key  # noqa: E402

WORLD_SIZE = 2


def make_batch(config: InternS1VLConfig, rank: int, step: int) -> dict[str, torch.Tensor]:
    """Two sequences of 16 text tokens, different on every rank and step."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    input_ids = torch.randint(0, 80, (2, 16), generator=g)
    return dict(input_ids=input_ids, labels=input_ids.clone())


def compile_model(model: torch.nn.Module, backend: str) -> tuple[Any, Any]:
    """The compiled model and the backend object (whose ``reports`` say what each pass did)."""
    import moe_passes

    torch._dynamo.config.capture_scalar_outputs = True  # split sizes of the all-to-all are data dependent
    passes = ("async_offload",) if backend == "offload" else moe_passes.BackendConfig().passes
    compiler = moe_passes.make_backend(passes=passes)
    return torch.compile(model, backend=compiler, fullgraph=True), compiler


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if not is_expert_key(name):
            dist.all_reduce(param.grad)
        param.grad /= world_size


def describe_offload(compiler: Any) -> list[str]:
    """What the pass offloaded (and what it left alone, and why), from the backend's report."""
    lines = []
    for graph in compiler.reports:
        for record in graph.get("pre_grad", []):
            if record["name"] != "async_offload":
                continue
            stats = record["stats"]
            lines.append(
                f"async_offload: {stats.get('offloaded', 0)} router outputs to the host, "
                f"{stats.get('offloaded_bytes', 0)} bytes per step; device bytes released early "
                f"{stats.get('device_bytes_released', 0)}, kept for backward {stats.get('device_bytes_kept_for_backward', 0)}, "
                f"kept for the gradient edge {stats.get('device_bytes_kept_for_gradient', 0)}"
            )
            for out in stats.get("outputs", []):
                lines.append(f"  {out['kind']:<16} {out['module']}  {out['shape']} {out['dtype']}  {out['bytes']} B: "
                             f"{out['device_buffer']}")
            for skip in record["skipped"]:
                lines.append(f"  not offloaded: {skip['region']}: {skip['reason']}")
    return lines or ["async_offload: no report (the pass did not run)"]


def expert_load(selected: tuple[torch.Tensor, ...], num_experts: int) -> torch.Tensor:
    """[layers, experts] token copies routed to each expert, from host tensors (no device sync)."""
    return torch.stack([torch.bincount(s.reshape(-1), minlength=num_experts) for s in selected])


def train(rank: int, world_size: int, port: int, backend: str, steps: int, record: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        config = InternS1VLConfig.tiny()
        num_experts = config.text.num_experts
        torch.manual_seed(0)
        full_state = InternS1VLForConditionalGeneration(config).state_dict()  # same weights on every rank
        model = InternS1VLForConditionalGeneration(config, ep_group=dist.group.WORLD)
        load_hf_state_dict(model, full_state)
        initial = copy.deepcopy(model.state_dict())
        step_fn, compiler = compile_model(model, backend)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        replay: list[dict[str, Any]] = []
        for step in range(1, steps + 1):
            start = time.perf_counter()
            batch = make_batch(config, rank, step)
            out = step_fn(**batch, output_router_logits=True)
            out.loss.backward()
            average_gradients(model, world_size)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # Everything below reads host tensors handed over by the pass: no blocking device copy.
            selected, logits = out.selected_experts, out.router_logits
            assert all(t.device.type == "cpu" for t in selected + logits), "router outputs are not host tensors"
            replay.append({"step": step, "input_ids": batch["input_ids"], "selected_experts": [s.clone() for s in selected]})
            load = expert_load(selected, num_experts)
            dist.all_reduce(load)  # gloo, on host tensors
            top1 = torch.stack([r.detach().float().softmax(-1).amax(-1).mean() for r in logits])
            dist.all_reduce(top1)
            top1 /= world_size
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            if step == 1:
                offloaded = sum(r["stats"].get("offloaded", 0) for g in compiler.reports for r in g.get("pre_grad", [])
                                if r["name"] == "async_offload")
                if offloaded < 2 * config.text.num_hidden_layers:
                    raise SystemExit(f"rank {rank}: async_offload handed {offloaded} router outputs to the host, expected "
                                     f"{2 * config.text.num_hidden_layers}:\n" + "\n".join(describe_offload(compiler)))
            if rank == 0:
                if step == 1:
                    print("\n".join(describe_offload(compiler)), flush=True)
                print(f"step {step}/{steps}  loss {loss.item() / world_size:.4f}  "
                      f"({time.perf_counter() - start:.2f}s, backend={backend})", flush=True)
                for layer, (row, p) in enumerate(zip(load.tolist(), top1.tolist())):
                    imbalance = max(row) / (sum(row) / len(row))
                    print(f"  layer {layer} expert load {row}  max/mean {imbalance:.2f}  mean top-1 prob {p:.3f}",
                          flush=True)
        check_replay(config, initial, replay[0], rank)
        if record:
            path = Path(record).with_suffix(f".rank{rank}.pt")
            torch.save(replay, path)
            if rank == 0:
                print(f"routing decisions recorded for replay: {record} (one file per rank)", flush=True)
    finally:
        dist.destroy_process_group()


def check_replay(config: InternS1VLConfig, initial: dict[str, torch.Tensor], first: dict[str, Any], rank: int) -> None:
    """Replay step 1 eagerly from its weights and batch: every token must take the recorded experts."""
    model = InternS1VLForConditionalGeneration(config, ep_group=dist.group.WORLD)
    model.load_state_dict(initial)
    with torch.no_grad():
        out = model(first["input_ids"], output_router_logits=True)
    same = all(torch.equal(a, b) for a, b in zip(out.selected_experts, first["selected_experts"]))
    decisions = sum(s.numel() for s in first["selected_experts"])
    flags = torch.tensor([int(same)])
    dist.all_reduce(flags)
    if rank == 0:
        verdict = "reproduced exactly" if flags.item() == dist.get_world_size() else "DIFFERS"
        print(f"replay of step 1: {decisions} routing decisions per rank {verdict}", flush=True)
    if not same:
        raise SystemExit(f"rank {rank}: replayed routing differs from the recorded host copies")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("offload", "domino"), default="offload",
                        help="offload: the async_offload pass alone; domino: the default pipeline")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--record", metavar="FILE", help="save each rank's routing decisions (FILE.rankN.pt)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    print(f"routing replay / expert-load logging on {WORLD_SIZE} CPU ranks (gloo), backend={args.backend}", flush=True)
    mp.spawn(train, args=(WORLD_SIZE, free_port(), args.backend, args.steps, args.record), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()

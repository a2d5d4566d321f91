"""Train the tiny InternS1-VL MoE model a few steps on 2 CPU processes (gloo), experts sharded over both.

    python examples/train_tiny.py                       # domino backend, regional compile (default)
    python examples/train_tiny.py --backend inductor --steps 3
    python examples/train_tiny.py --compile whole       # one graph for the whole model

Regional compile (the default) compiles each decoder layer / vision block on
its own with ``moe_passes.regional.compile_regions``: every layer reuses the
first layer's compiled graph, so compile time stays flat in the number of
layers (what torchtitan does). The model's aux-loss functions
(``load_balancing_loss``, ``router_z_loss``) are compiled with the same backend
(``compile_regions(..., functions=...)``), so all three passes apply: Domino EP
chunks the MoE region of the decoder-layer graph, ``async_offload`` sends its
router logits and selected experts to the host, and ``layerwise_aux_loss``
rewrites the loss graphs, whose inputs are every layer's router logits, into
per-layer sums. Whole-model compile unrolls every layer into one graph
(compile time grows with the layer count).

With the domino backend the run ends with the backend's ``summary()`` (rank 0;
the passes decide the same on every rank).

Each rank owns half of every layer's experts and its own batch (text with an
image); tokens travel to their experts through the dropless all-to-all. The
non-expert gradients are averaged over ranks (data parallel), the expert
gradients already hold every rank's tokens.
"""

from __future__ import annotations

import argparse
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

import moe_passes.models.interns1_vl.model as interns1_vl_model  # noqa: E402
from moe_passes.models.interns1_vl import InternS1VLConfig, InternS1VLForConditionalGeneration, load_hf_state_dict  # noqa: E402
from moe_passes.models.interns1_vl.hf_loading import is_expert_key  # noqa: E402

WORLD_SIZE = 2


def make_batch(config: InternS1VLConfig, rank: int) -> dict[str, torch.Tensor]:
    """Two sequences of 24 tokens; the first holds a 4x4-patch image (4 image tokens)."""
    g = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(0, 80, (2, 24), generator=g)
    input_ids[0, 1:5] = config.image_token_id
    labels = input_ids.masked_fill(input_ids == config.image_token_id, -100)
    v = config.vision
    pixel_values = torch.randn(16, v.in_channels * v.temporal_patch_size * v.patch_size**2, generator=g)
    return dict(input_ids=input_ids, labels=labels, pixel_values=pixel_values, image_grid_thw=torch.tensor([[1, 4, 4]]))


#: The functions the model calls to compute its aux losses, compiled with the backend under regional compile.
AUX_LOSS_FUNCTIONS = ((interns1_vl_model, "load_balancing_loss"), (interns1_vl_model, "router_z_loss"))


def make_compiler(backend: str) -> Any:
    """The torch.compile backend: a fresh ``DominoBackend`` (its reports are this model's alone) or "inductor"."""
    if backend == "domino":
        from moe_passes import make_backend

        return make_backend()
    return backend


def compile_model(model: torch.nn.Module, compiler: Any, mode: str = "regional") -> torch.nn.Module:
    if compiler == "eager":
        return model
    torch._dynamo.config.capture_scalar_outputs = True  # split sizes of the all-to-all are data dependent
    if mode == "regional":
        from moe_passes.regional import compile_regions

        # in place: the blocks, and the aux-loss functions the model's forward calls; embeddings stay eager
        compile_regions(model, backend=compiler, functions=AUX_LOSS_FUNCTIONS, fullgraph=True)
        return model
    return torch.compile(model, backend=compiler, fullgraph=True)


WHY = {
    "regional": "regional compile: each decoder layer and vision block is compiled once and every layer of its kind "
                "reuses that graph, so compile time does not grow with the layer count; the aux-loss functions are "
                "compiled with the same backend, so the loss is rewritten layer-wise too",
    "whole": "whole-model compile: one graph with every layer unrolled (compile time grows with the layer count)",
}


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if not is_expert_key(name):
            dist.all_reduce(param.grad)
        param.grad /= world_size


def train(rank: int, world_size: int, port: int, backend: str, steps: int, mode: str = "regional") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        config = InternS1VLConfig.tiny()
        torch.manual_seed(0)
        full_state = InternS1VLForConditionalGeneration(config).state_dict()  # same weights on every rank
        model = InternS1VLForConditionalGeneration(config, ep_group=dist.group.WORLD)
        load_hf_state_dict(model, full_state)
        compiler = make_compiler(backend)
        step_fn = compile_model(model, compiler, mode)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        batch = make_batch(config, rank)
        for step in range(1, steps + 1):
            start = time.perf_counter()
            out = step_fn(**batch)
            out.loss.backward()
            average_gradients(model, world_size)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats = torch.stack([out.loss.detach(), out.aux_loss.detach(), out.z_loss.detach()])
            dist.all_reduce(stats)
            stats /= world_size
            if rank == 0:
                print(f"step {step}/{steps}  loss {stats[0]:.4f}  aux {stats[1]:.4f}  z {stats[2]:.4f}  "
                      f"({time.perf_counter() - start:.2f}s, backend={backend})", flush=True)
        if rank == 0 and hasattr(compiler, "summary"):
            print(compiler.summary(), flush=True)
        # leave together: a rank tearing gloo down while its peer is still printing was seen to abort at exit
        # ("terminate called without an active exception") on a loaded 2-core machine
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("eager", "inductor", "domino"), default="domino")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", choices=("regional", "whole"), default="regional",
                        help="compile each layer on its own (default: compile time flat in layers) or the whole model")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    print(f"training the tiny InternS1-VL MoE on {WORLD_SIZE} CPU ranks (gloo), backend={args.backend}", flush=True)
    if args.backend != "eager":
        print(WHY[args.compile], flush=True)
    mp.spawn(train, args=(WORLD_SIZE, free_port(), args.backend, args.steps, args.compile), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()

"""Regional compile: compile each repeated block (decoder layer, MoE block) on its own.

Compiling the whole model makes Dynamo unroll every layer into one graph, so
tracing, the pre-grad passes, AOT autograd and Inductor all grow linearly
with the number of layers. Compiling each block instead (what torchtitan does:
``block.compile(...)`` per transformer block) gives one graph that every
block of the same class reuses: parameters are graph inputs
(``inline_inbuilt_nn_modules``), so the second and later layers hit Dynamo's
cache and compile time stays flat in the layer count.

    from moe_passes import make_backend
    from moe_passes.regional import compile_regions

    compile_regions(model, backend=make_backend(num_chunks=2))   # every decoder/vision layer
    loss = model(**batch).loss                                     # top level stays eager

    # ... and the functions that compute the aux loss, compiled with the same backend:
    import mymodel.modeling as modeling
    compile_regions(model, backend=backend,
                    functions=[(modeling, "load_balancing_loss"), (modeling, "router_z_loss")])

What moves out of the compiled region: everything between blocks (embeddings,
the final norm, the loss). The per-region passes (``domino_ep``,
``async_offload`` on a block's router outputs, the overlap scheduler) apply to
each block graph and their result is reused by every layer. The aux loss is
not in any block graph: it runs where the model computes it. Compile the
function that computes it with the same backend (``torch.compile(loss_fn,
backend=...)``) and ``layerwise_aux_loss`` rewrites it there: every layer's
router logits arrive as graph inputs and become per-layer reductions, with no
concatenation, stacked softmax or one-hot (measured: the loss graph's
forward+backward peak 5.25 -> 0.81 MiB at 4 layers, 512 tokens, 32 experts;
``tests/test_layerwise_aux_loss.py -k regional_compile``). ``functions=``
does that for you: each ``(owner, name)`` names a function the model calls by
attribute lookup (a module-level function of the modeling module, a method)
and is replaced there by its compiled version, so the model's own forward
calls the compiled loss. Left eager, no backend sees the loss:
``compile_regions`` says so in the log when its backend carries the aux-loss
pass and no ``functions`` are given.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["compile_regions", "find_regions"]


def find_regions(model: nn.Module, block_types: Sequence[type[nn.Module]] | None = None) -> list[tuple[str, nn.Module]]:
    """The blocks ``compile_regions`` compiles, outermost first, as ``(qualified name, module)``.

    ``block_types`` given: every module of one of those classes that is not
    inside another selected one. Not given: every entry of an ``nn.ModuleList``
    whose entries all share one class (the decoder layers, the vision blocks),
    again outermost only.
    """
    selected: list[tuple[str, nn.Module]] = []

    def inside_selected(name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix, _ in selected)

    if block_types is not None:
        types = tuple(block_types)
        if not types:
            raise ValueError("block_types is empty; pass the block classes to compile or None for auto-detection")
        for name, module in model.named_modules():
            if isinstance(module, types) and name and not inside_selected(name):
                selected.append((name, module))
        if not selected and isinstance(model, types):
            selected.append(("", model))
        return selected

    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or inside_selected(name):
            continue
        classes = {type(m) for m in module}
        if len(classes) != 1:
            continue
        for index, block in enumerate(module):
            selected.append((f"{name}.{index}" if name else str(index), block))
    return selected


def compile_regions(
    model: nn.Module,
    backend: str | Callable[..., Any] = "inductor",
    block_types: Sequence[type[nn.Module]] | None = None,
    functions: Sequence[tuple[Any, str]] = (),
    **compile_kwargs: Any,
) -> list[str]:
    """Compile every block of ``model`` in place with ``module.compile(backend=..., **compile_kwargs)``.

    Returns the qualified names of the compiled blocks. Blocks of one class
    share Dynamo's cache entry (one graph, one Inductor compile) as long as
    their inputs have the same shapes and dtypes. Raises ``ValueError`` when
    nothing matches (a silent no-op would leave the model eager).
    Multi-process EP needs ``torch._dynamo.config.capture_scalar_outputs = True``
    for the all-to-all split sizes, exactly as whole-model compile does.

    ``functions``: ``(owner, name)`` pairs, e.g. ``(modeling_module, "load_balancing_loss")``:
    ``getattr(owner, name)`` is compiled with the same backend and options and set back on
    ``owner`` in its place (the aux-loss functions, so ``layerwise_aux_loss`` sees the loss). This
    changes ``owner`` for everyone who looks the name up there (every model of that module in the
    process); the original stays reachable as ``compiled._torchdynamo_orig_callable``. Their
    qualified names (``module.function``) follow the blocks' in the returned list.
    """
    regions = find_regions(model, block_types)
    if not regions:
        what = f"modules of type {[t.__name__ for t in block_types]}" if block_types else "nn.ModuleList of same-class blocks"
        raise ValueError(f"compile_regions: {type(model).__name__} has no {what} to compile")
    targets = []
    for owner, attr in functions:
        fn = getattr(owner, attr, None)
        if not callable(fn):
            raise ValueError(f"compile_regions: {_owner_name(owner)}.{attr} is not a function to compile")
        targets.append((owner, attr, fn))
    for _, block in regions:
        block.compile(backend=backend, **compile_kwargs)
    compiled_functions = []
    for owner, attr, fn in targets:
        if getattr(fn, "_torchdynamo_orig_callable", None) is None:  # not compiled yet (a second call keeps one)
            setattr(owner, attr, torch.compile(fn, backend=backend, **compile_kwargs))
        compiled_functions.append(f"{_owner_name(owner)}.{attr}")
    log.info("compile_regions: compiled %d blocks (%s) and %d function(s) with backend %r", len(regions),
             ", ".join(sorted({type(b).__name__ for _, b in regions})), len(compiled_functions), backend)
    passes = getattr(getattr(backend, "config", None), "passes", ())
    if "layerwise_aux_loss" in passes and not functions:
        log.warning(
            "compile_regions: layerwise_aux_loss only sees graphs that compute the aux loss, and the blocks do "
            "not: pass the functions that compute it (functions=[(module, 'aux_loss_fn')]) or compile them with "
            "the same backend (torch.compile(loss_fn, backend=...)), or the aux loss stays stacked and eager"
        )
    return [name for name, _ in regions] + compiled_functions


def _owner_name(owner: Any) -> str:
    return getattr(owner, "__name__", None) or type(owner).__name__


def compiled_graph_count() -> int:
    """Unique graphs Dynamo compiled in this process so far (flat in layers under regional compile)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


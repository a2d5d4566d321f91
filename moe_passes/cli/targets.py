"""Targets for ``moe-passes diff``: a model plus example inputs.

A target is either a preset name, ``package.module:function`` or
``path/to/file.py:function`` (the file loaded as a module) returning
``(model_or_fn, example_inputs)``. The built-in ``moe_stack`` preset (stacked
``SparseMoeBlock``s + the stacked balancing and z-losses) is the smallest
real input; other preset names go to the reference model,
``moe_passes.models.interns1_vl.preset(name)`` (``tiny``, ``tiny-vl``, ...), trained on
random token ids with labels (and one image, except ``tiny``). Real-shape
presets (``META_PRESETS``: ``interns1-pro``) are built and traced on the meta
device, so nothing is allocated; ``meta=True`` does that for any target.
A factory breaking the ``(model, example_inputs)`` contract raises
``TargetError`` naming the contract.

The diff CLI runs on one process with the *fake* process group, whose
all-to-all hallucinates data (every rank "receives" what rank 0 would): the
shapes stay consistent as long as rank 0's experts get at least one token,
which random router weights and a few tokens give in practice.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

BUILTIN_PRESETS = ("moe_stack",)


@dataclass
class Target:
    """What the CLI compiles: ``fn(*example_inputs)`` returns the loss (the reference presets also return their router tensors)."""

    name: str
    fn: Callable[..., Any]
    example_inputs: list[Any]
    description: str = ""
    meta: bool = False
    num_layers: int | None = None
    total_layers: int | None = None


def ep_group_or_none() -> dist.ProcessGroup | None:
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def moe_stack(seed: int = 0, batch: int = 2, seq: int = 4, **kwargs: Any) -> Target:
    """Built-in preset: 2 MoE layers, 4 experts, top-2, EP over the default group when there is one."""
    torch.manual_seed(seed)
    group = ep_group_or_none()
    check_expert_parallel("moe_stack", kwargs.get("num_experts", MOE_STACK_EXPERTS))
    from moe_passes.models.stacks import preset_stack  # imports the reference model: only when the preset is built

    model = preset_stack(ep_group=group, **kwargs)
    hidden = model.layers[0].hidden_size
    x = torch.randn(batch, seq, hidden, requires_grad=True)
    target = torch.randn(batch, seq, hidden)
    layers = len(model.layers)
    return Target("moe_stack", model, [x, target], description=f"moe_stack: {layers} MoE layers, {batch} x {seq} tokens",
                  num_layers=layers, total_layers=layers)


class TargetError(ValueError):
    """The target cannot be resolved: unknown preset, unimportable module, factory breaking the contract."""


#: Experts of the ``moe_stack`` preset (``moe_passes.models.stacks.preset_stack``'s default).
MOE_STACK_EXPERTS = 4


def check_expert_parallel(name: str, num_experts: int) -> None:
    """A preset's experts must split evenly over the ranks (the fake group's size): say which sizes do."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if num_experts % world:
        divisors = [str(d) for d in range(1, num_experts + 1) if num_experts % d == 0]
        sizes = ", ".join(divisors[:-1]) + f" or {divisors[-1]}" if len(divisors) > 1 else divisors[0]
        raise TargetError(f"{name} has {num_experts} experts, which {world} ranks cannot share evenly "
                          f"(expert parallelism): use --world-size {sizes}")


CONTRACT = "(model, example_inputs): a callable and the list or tuple of its positional inputs"

#: Presets shown at their real shape by default: traced on the meta device (nothing allocated).
META_PRESETS = {"interns1-pro": {"layers": 3, "world_size": 8, "batch": 1, "seq": 8192}}


def _image_batch(config: Any, batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids with one image (a 4 x 4 merged-patch grid) in sequence 0, its pixels and grid; labels mask it."""
    v = config.vision
    text_vocab = min(config.image_token_id, config.vision_start_token_id or config.image_token_id)
    ids = torch.randint(0, text_vocab, (batch, seq), generator=generator)
    side = 2 * v.spatial_merge_size
    grid = torch.tensor([[1, side, side]])
    tokens = (side * side) // v.spatial_merge_size**2
    ids[0, 1 : 1 + tokens] = config.image_token_id
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pixels = torch.randn(side * side, patch_dim, generator=generator)
    labels = ids.clone()
    labels[labels == config.image_token_id] = -100
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid, "labels": labels}


def _reference_model_preset(name: str, layers: int | None = None, meta: bool | None = None) -> Target:
    """``moe_passes.models.interns1_vl.preset(name)``: the reference model, loss on random tokens and one image.

    ``tiny`` is fed text only (the smallest graph); the other presets get one
    image too, so the vision tower's graph is part of what the passes see.
    ``meta`` builds model and inputs on the meta device: shapes and dtypes
    only, so a real-shape preset (``interns1-pro``) traces without allocating.
    """
    try:
        ref = importlib.import_module("moe_passes.models.interns1_vl")
        preset = ref.preset
        presets = sorted(ref.PRESETS)
    except (ImportError, AttributeError) as e:
        raise TargetError(f"unknown preset {name!r}: built-in presets are {list(BUILTIN_PRESETS)} and the reference model "
                          f"is not importable ({e})") from e
    if name not in presets:
        raise TargetError(f"unknown preset {name!r}; choose one of {sorted([*BUILTIN_PRESETS, *presets])}, "
                          "or give package.module:function or path/to/file.py:function")
    shape = META_PRESETS.get(name, {})
    meta = bool(shape) if meta is None else meta
    layers = layers if layers is not None else shape.get("layers")
    config = preset(name)
    check_expert_parallel(name, config.text.num_experts)
    total_layers = config.text.num_hidden_layers
    if layers is not None:
        if layers < 1:
            raise TargetError(f"--layers must be >= 1, got {layers}")
        layers = min(layers, total_layers)
        deepstack = config.vision.deepstack_visual_indexes
        if len(deepstack) > layers:  # each deepstack level feeds one decoder layer
            log.info("%s: keeping %d of %d deepstack levels for %d decoder layers", name, layers, len(deepstack), layers)
            config = config.replace(vision={"deepstack_visual_indexes": tuple(deepstack[:layers])})
        config = config.replace(text={"num_hidden_layers": layers})
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch, seq = shape.get("batch", 2), shape.get("seq", 8 if name == "tiny" else 16)
    if name == "tiny":
        ids = torch.randint(0, config.text.vocab_size, (batch, seq), generator=g)
        inputs: dict[str, torch.Tensor] = {"input_ids": ids, "labels": ids.clone()}
    else:
        inputs = _image_batch(config, batch, seq, g)
    keys = list(inputs)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = ref.InternS1VLForConditionalGeneration(config, ep_group=ep_group_or_none())
    if meta:
        inputs = {k: v.to("meta") for k, v in inputs.items()}

    def loss_fn(*args: torch.Tensor) -> tuple[Any, ...]:
        # As users run it for expert-load logging / routing replay: the router tensors are returned too.
        out = model(**dict(zip(keys, args)), output_router_logits=True)
        return out.loss, out.router_logits, out.selected_experts

    shown = config.text.num_hidden_layers
    what = f"{shown} of {total_layers} decoder layers" if shown != total_layers else f"{shown} decoder layers"
    desc = f"{name}: {what}, {batch} x {seq} tokens{', one image' if 'pixel_values' in inputs else ''}"
    if meta:
        desc += ", on the meta device (nothing allocated)"
    return Target(name, loss_fn, [inputs[k] for k in keys], description=desc, meta=meta,
                  num_layers=shown, total_layers=total_layers)


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        shown = ", ".join(type(v).__name__ for v in value[:4])
        return f"{type(value).__name__} of {len(value)}: ({shown}{', ...' if len(value) > 4 else ''})"
    return type(value).__name__


def _check_signature(spec: str, fn: Any, inputs: list[Any]) -> None:
    """``fn(*example_inputs)`` must bind: say so now, not as a TypeError from deep inside Dynamo."""
    call = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        sig = inspect.signature(call)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*inputs)
    except TypeError as e:
        raise TargetError(
            f"target {spec!r} must return {CONTRACT}; calling the model with its {len(inputs)} example input(s) fails: {e}"
        ) from e


FORM = "package.module:function, path/to/file.py:function, or a preset name"


def _looks_like_path(module_name: str) -> bool:
    return module_name.endswith(".py") or "/" in module_name or "\\" in module_name


def _load_file(path_text: str) -> Any:
    """The Python file ``path_text`` loaded as a module (its directory importable, as ``python file.py`` has it)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(path_text).expanduser()
    if not path.is_file():
        raise TargetError(f"target file {path_text!r} does not exist" if not path.exists() else f"target {path_text!r} is not a file")
    if path.suffix != ".py":
        raise TargetError(f"target file {path_text!r} is not a .py file; a target is {FORM}")
    module_name = f"moe_passes_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load target file {path_text!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the file's own imports of its neighbours
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise TargetError(f"cannot load target file {path_text!r}: {type(e).__name__}: {e}") from e
    return module


def _public_functions(module: Any) -> list[str]:
    """The functions ``module`` defines itself (not imported ones, not classes), by name."""
    return sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
                  and v.__module__ == module.__name__)


def _from_factory(spec: str, meta: bool) -> Target:
    module_name, _, attr = spec.rpartition(":") if _looks_like_path(spec.rpartition(":")[0]) else spec.partition(":")
    if not attr:
        raise TargetError(f"target {spec!r} names no function after ':'; a target is {FORM}")
    if _looks_like_path(module_name):
        module = _load_file(module_name)
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # ImportError, SyntaxError, anything the module raises while importing
            raise TargetError(f"cannot import target module {module_name!r}: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = _public_functions(module)
        hint = f" (its functions: {', '.join(found[:8])})" if found else ""
        raise TargetError(f"target {spec!r}: module {module_name!r} has no callable {attr!r}{hint}")
    with torch.device("meta") if meta else contextlib.nullcontext():
        try:
            produced = factory()
        except Exception as e:
            raise TargetError(f"target {spec!r}: {attr}() raised {type(e).__name__}: {e}") from e
    if isinstance(produced, Target):
        return produced
    if isinstance(produced, nn.Module) or not isinstance(produced, (tuple, list)) or len(produced) != 2:
        raise TargetError(f"target {spec!r} must return {CONTRACT}; got {_describe(produced)}")
    fn, inputs = produced
    if not callable(fn):
        raise TargetError(f"target {spec!r} must return {CONTRACT}; the model is a {type(fn).__name__}, which is not callable")
    if not isinstance(inputs, (tuple, list)):
        raise TargetError(
            f"target {spec!r} must return {CONTRACT}; example_inputs is a {type(inputs).__name__} "
            f"(wrap a single input as [x])"
        )
    _check_signature(spec, fn, list(inputs))
    return Target(spec, fn, list(inputs), description=spec, meta=meta)


def resolve_target(spec: str, layers: int | None = None, meta: bool | None = None) -> Target:
    """``preset`` name, ``package.module:function`` or ``path/to/file.py:function``; a bad spec raises
    ``TargetError`` saying why (a bare file path: which form names its function).

    ``layers``: decoder layers to build (reference-model presets; the built-in
    stack takes it as its layer count). ``meta``: trace on the meta device
    (default: only for real-shape presets such as ``interns1-pro``).
    """
    if ":" in spec:
        if layers is not None:
            raise TargetError("--layers applies to presets only; a package.module:function target builds its own model")
        return _from_factory(spec, bool(meta))
    if _looks_like_path(spec):
        if not spec.endswith(".py"):
            raise TargetError(f"target {spec!r} looks like a path but names no .py file; a target is {FORM}")
        functions = _public_functions(_load_file(spec))
        example = functions[0] if len(functions) == 1 else "make_model"
        listed = f"; its functions: {', '.join(functions[:8])}" if functions else ""
        raise TargetError(f"target {spec!r} is a file without a function: name the one that returns {CONTRACT}, "
                          f"as {spec}:{example}{listed}")
    if spec in BUILTIN_PRESETS:
        with torch.device("meta") if meta else contextlib.nullcontext():
            target = moe_stack(**({"num_layers": layers} if layers is not None else {}))
        target.meta = bool(meta)
        if meta:
            target.example_inputs = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in target.example_inputs]
            target.description += ", on the meta device (nothing allocated)"
        return target
    return _reference_model_preset(spec, layers, meta)

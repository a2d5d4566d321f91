"""Module facts: which ``nn.Module`` a node came from (``nn_module_stack``), and graph-wide node utilities."""

from __future__ import annotations

from typing import Any, Iterable

import torch.fx as fx

# ---------------------------------------------------------------- modules


def module_path(node: fx.Node, depth: int | None = None) -> str | None:
    """Module path of a node from ``nn_module_stack``: innermost, or the entry at ``depth`` (0 = outermost)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    entries = list(stack.values())
    if depth is not None:
        if depth >= len(entries):
            return None
        entry = entries[depth]
    else:
        entry = entries[-1]
    return entry[0] if isinstance(entry, tuple) else str(entry)


def module_types(node: fx.Node) -> list[tuple[str, type | str]]:
    """(path, module type) pairs of a node's ``nn_module_stack``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(v[0], v[1]) if isinstance(v, tuple) else (str(v), "") for v in stack.values()]


def type_name(t: type | str) -> str:
    return t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1].strip("'>")


def nodes_in_order(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """``nodes`` sorted by their position in their graph."""
    nodes = list(nodes)
    if not nodes:
        return []
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return sorted(nodes, key=order.__getitem__)


def copy_node_attributes(src: fx.Graph, dst: fx.Graph) -> None:
    """Carry the attributes set on nodes outside ``meta`` (Dynamo's ``_dynamo_source`` on placeholders,
    which AOT autograd requires) from ``src`` to the same-named nodes of ``dst``; ``Graph.__deepcopy__``
    and ``graph_copy`` do not copy them."""
    by_name = {n.name: n for n in dst.nodes}
    for n in src.nodes:
        extra = getattr(n, "__dict__", None)
        if extra and n.name in by_name:
            for key, value in extra.items():
                if key.startswith("_dynamo"):
                    setattr(by_name[n.name], key, value)


def source_line(node: fx.Node) -> str | None:
    """Where the user wrote the op a node came from: ``"moe.py:153 (logits = logits.cumsum(0))"``, from the
    innermost frame of the ``stack_trace`` Dynamo records (kept by the canonical re-trace); None without one."""
    trace = node.meta.get("stack_trace")
    if not isinstance(trace, str):
        return None
    frames = [line for line in trace.splitlines() if line.strip().startswith('File "')]
    if not frames:
        return None
    last = frames[-1].strip()
    try:
        path = last.split('"')[1]
        lineno = last.split(", line ")[1].split(",")[0]
    except IndexError:
        return None
    lines = trace.splitlines()
    code = ""
    i = lines.index(frames[-1]) if frames[-1] in lines else -1
    if 0 <= i < len(lines) - 1:
        code = lines[i + 1].strip()
    where = f"{path.rsplit('/', 1)[-1]}:{lineno}"
    return f"{where} ({code})" if code and not set(code) <= set("^~ ") else where


def _closure(start: Iterable[fx.Node], step: Any) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(start)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node they read, transitively."""
    return _closure(nodes, lambda n: n.all_input_nodes)


def descendants(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node that reads it, transitively."""
    return _closure([node], lambda n: n.users)

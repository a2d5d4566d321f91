"""The one row analysis (``moe_passes.ir.rows``): what each ATen op does to rows, from its schema and
normalised dims, for every pass that asks (Domino's token rows, the aux loss's stacked layer rows)."""

from __future__ import annotations

import operator
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from moe_passes.ir import rows
from moe_passes.ir.rows import Effect, effect, family_of, rule

aten = torch.ops.aten


def _last_op(fn: Callable[..., Any], *args: torch.Tensor) -> fx.Node:
    gm = make_fx(fn, pre_dispatch=True)(*args)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    return calls[-1]


X = torch.randn(6, 4)
X3 = torch.randn(2, 3, 4)


@pytest.mark.parametrize("fn, lead, kind, family", [
    (lambda x: torch.softmax(x, -1), 1, "keep", "along"),
    (lambda x: torch.softmax(x, 0), 1, "mix", "along"),
    (lambda x: torch.softmax(x, -2), 1, "mix", "along"),              # -2 of a 2-D value is the row dim
    (lambda x: torch.softmax(x, 1), 2, "mix", "along"),               # [B, S, H] rows: dim 1 is a row dim
    (lambda x: x.cumsum(0), 1, "mix", "along"),
    (lambda x: x.topk(2)[0], 1, "keep", "along"),
    (lambda x: x.sum(-1), 1, "keep", "reduce"),
    (lambda x: x.sum(0), 1, "reduce", "reduce"),
    (lambda x: x.mean(), 1, "reduce", "reduce"),
    (lambda x: x.amax(0), 1, "reduce", "reduce"),
    (lambda x: x.norm(dim=0), 1, "reduce", "reduce"),                 # dim is linalg_vector_norm's 3rd argument
    (lambda x: x.norm(dim=1), 1, "keep", "reduce"),
    (lambda x: x.t(), 1, "mix", "shape"),
    (lambda x: x.unsqueeze(0), 1, "mix", "shape"),
    (lambda x: x.unsqueeze(-1), 1, "keep", "shape"),
    (lambda x: x[1:], 1, "mix", "shape"),
    (lambda x: x[:, 1:], 1, "keep", "shape"),
    (lambda x: x.reshape(-1), 1, "keep", "view"),
    (lambda x: torch.exp(x), 1, "keep", "pointwise"),
    (lambda x: x.float(), 1, "keep", "identity"),
    (lambda x: torch.nn.functional.dropout(x, 0.5, training=True), 1, "mix", "pointwise"),
    (lambda x: torch.nn.functional.dropout(x, 0.0, training=True), 1, "keep", "pointwise"),
])
def test_effect_follows_the_ops_meaning(fn: Callable[..., Any], lead: int, kind: str, family: str) -> None:
    node = _last_op(fn, X3 if lead == 2 else X)
    e = effect(node, lead)
    assert e is not None and (e.kind, e.family) == (kind, family), (node.format_node(), e)
    if kind == "mix":
        assert e.reason, "a mix says how it crosses rows"


def test_linear_reductions_are_named() -> None:
    assert effect(_last_op(lambda x: x.sum(0), X), 1).linear == "sum"
    assert effect(_last_op(lambda x: x.mean(0), X), 1).linear == "mean"
    assert effect(_last_op(lambda x: x.amax(0), X), 1).linear is None
    assert effect(_last_op(lambda x: torch.histc(x, 4), X), 1).linear == "count"


def test_tuple_results_say_how_many() -> None:
    assert effect(_last_op(lambda x: x.topk(2), X), 1).outputs == 2
    assert effect(_last_op(lambda x: x.max(-1), X), 1).outputs == 2
    assert effect(_last_op(lambda x: x.max(), X), 1).outputs == 0


def test_an_op_without_a_rule_has_no_effect_without_dtensor() -> None:
    """No rule and no initialised process group for DTensor's propagation: no opinion (the caller declines)."""
    node = _last_op(lambda x: torch.roll(x, 1, 0), X)
    assert family_of(node) is None
    assert effect(node, 1) is None


def test_one_rule_per_op() -> None:
    with pytest.raises(ValueError, match="two row rules"):
        rule(aten.softmax, family="along")(lambda node, lead: Effect("keep", "along", lead))
    assert aten.softmax in rows.RULES


def test_broadcast_over_rows() -> None:
    assert not rows.broadcast_spans_rows((4,), 2, 1)          # a bias over the hidden dim
    assert not rows.broadcast_spans_rows((1, 4), 2, 1)
    assert rows.broadcast_spans_rows((6, 4), 2, 1)            # one value per row: not replicated across chunks
    assert rows.broadcast_spans_rows((3, 1), 3, 2)            # [S, 1] against [B, S, H] with 2 row dims

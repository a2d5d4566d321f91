"""Row-locality of every value in a candidate region, from op meaning (canonical ATen IR).

Chunking a region into token chunks is exact when the region, run on rows
``[t0, t1)`` of the token matrix X, yields exactly rows ``[t0, t1)`` of each
output that leaves it (and, for per-expert counters, the chunk's share of a
sum).  ``row_analysis`` proves that value by value, in graph order, in this small
abstract domain (``Kind``):

``row(m)``
    dim 0 is token-major with ``m`` rows per token (X itself is ``row(1)``;
    the flattened ``[T*K]`` top-k ids are ``row(K)``): the chunk's value is the
    slice ``[t0*m, t1*m)`` of the full value.
``perm(key)``
    ``argsort``/``sort`` over dim 0 of a 1-D integer ``row(m)`` value (expert
    ids): a permutation of the chunk's own ``T*m`` copies.
``tokidx(key)``
    ``perm // q`` (``q`` divides ``m``): for each sorted copy, its row in a
    ``row(m // q)`` value (``per``); in MoE mode the token (``q = m``), in
    whole-layer mode, where the chunked unit is a sequence of S tokens, the
    token too (``per = S``).
``bag(key)``
    rows are the chunk's token copies in the order of ``perm(key)``; each row
    is computed from its own token only.
``recv(d, p)``
    rows received by the dispatch all-to-all ``d`` (then locally reordered by
    the permutation node ``p``, or as received when ``p`` is None).
``recvw``
    a replicated tensor (expert weights) gathered per received row by the
    chunk's layout metadata (``w1[expert_of_row]``): aligned with the chunk's
    received rows, and only ever combined with them.
``seg(split, i)``
    piece ``i`` of received rows split by the chunk's own counts
    (``torch.split(rows, counts.tolist())``); ``cat`` of every piece of one
    split, in order, is the split's rows again.
``meta``
    chunk-local layout metadata: counts, split sizes, offsets, permutations of
    received rows.  Never token data.
``add``
    integer counts over the chunk's tokens (``histc``/``bincount``/
    ``scatter_add`` of ids, a sum over dim 0 of an integer ``row`` value): the
    full value is the SUM of the chunk values.

The rules that assign kinds are in ``row_analysis``: the MoE algebra (permutations,
gathers, the all-to-all pair, grouped GEMMs, counters) on top of the one row
analysis every pass asks (``moe_passes.ir.rows``, with DTensor's sharding rules as
its fallback).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from moe_passes.ir.rows import NotRowLocal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    tag: str  # row | perm | tokidx | bag | recv | recvw | seg | meta | add | fresh | none
    m: int = 1  # rows per token (row, perm, tokidx)
    key: Any = None  # perm identity (perm, tokidx, bag); dispatch node (recv)
    p: Any = None  # recv: the permutation node applied to received rows (None: as received)
    fresh: bool = False  # a freshly allocated buffer (zeros/empty), any layout
    lead: int = 1  # row: how many leading dims flatten to the token-major index ([B, L, ...] -> 2)
    per: int = 1  # tokidx: rows per chunked unit of the value it indexes (whole-layer mode: S tokens per sequence)

    def __str__(self) -> str:
        """In the user's terms (reasons are read by people who never saw this lattice)."""
        if self.tag == "row":
            what = "token rows" if self.m == 1 else f"routed copies ({self.m} per token)"
            return what if self.lead == 1 else f"{what} over {self.lead} leading dims"
        if self.tag == "perm":
            return f"the expert-sort order ({getattr(self.key, 'name', self.key)})"
        if self.tag == "tokidx":
            return "the token of each sorted copy"
        if self.tag == "bag":
            return "token copies sorted by expert"
        if self.tag == "recv":
            return f"rows received by {getattr(self.key, 'name', self.key)}" + (" (reordered)" if self.p is not None else "")
        return {"recvw": "expert weights per received row", "seg": "one expert's piece of the received rows",
                "meta": "layout metadata (counts, sizes, offsets)", "add": "per-expert counts",
                "fresh": "a fresh buffer", "none": "no value", "blocked": "a value that could not be proven"}.get(self.tag, self.tag)


def row(m: int, lead: int = 1) -> Kind:
    return Kind("row", m, lead=lead)


def lead_of(k: Any) -> int:
    """Number of leading (token) dims of a kind: ``lead`` for rows, 1 for every other data kind."""
    return k.lead if isinstance(k, Kind) and k.tag == "row" else 1


def token_prefix(shape: Any, T: Any) -> tuple[int, Any] | None:
    """(lead, m): the shortest prefix of ``shape`` whose product is a positive multiple ``m * T`` of T, else None.

    Sizes and T may be SymInts (dynamic shapes): the quotient ``prod / T`` must then be a positive
    sympy ``Integer`` on its own (``[1, s0, 16]`` over ``T = s0`` -> ``(2, 1)``; ``[2*s0]`` -> ``(1, 2)``),
    or a monomial of the sizes' symbols with a positive integer coefficient (whole-layer mode, B
    sequences of a symbolic length S: ``[B*S*K]`` over ``T = B`` -> ``(1, K*S)``, a sympy expression),
    decided from the expressions alone: no guard, no specialisation on the current sizes.
    """
    prod: Any = 1
    for i, s in enumerate(shape):
        prod = prod * s
        m = positive_quotient(prod, T)
        if m is None:
            m = monomial_quotient(prod, T)
        if m is not None:
            return i + 1, m
    return None


def size_expr(v: Any) -> Any:
    """A size as a sympy expression (ints, SymInts, sympy expressions), else None."""
    import sympy

    if isinstance(v, torch.SymInt):
        return v.node.expr
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return sympy.Integer(v)
    return v if isinstance(v, sympy.Expr) else None


def monomial_quotient(prod: Any, T: Any) -> Any:
    """``prod / T`` when it is a product of size symbols (positive powers) and a positive integer, else None."""
    import sympy

    p, t = size_expr(prod), size_expr(T)
    if p is None or t is None or t == 0:
        return None
    q = sympy.cancel(p / t)
    if q.is_Integer or not q.free_symbols:
        return None
    coeff, rest = q.as_coeff_Mul()
    factors = rest.args if rest.is_Mul else (rest,)
    ok = coeff.is_Integer and coeff > 0 and all(
        f.is_Symbol or (f.is_Pow and f.base.is_Symbol and f.exp.is_Integer and f.exp > 0) for f in factors)
    return q if ok else None


def same_size(a: Any, b: Any) -> bool:
    """``a == b`` for ints, SymInts and sympy sizes, decided from the expressions (no guard; unknown: False)."""
    import sympy

    ea, eb = size_expr(a), size_expr(b)
    if ea is None or eb is None:
        return False
    try:
        return sympy.simplify(ea - eb) == 0
    except Exception:  # noqa: BLE001 - unknown means not equal
        return False


def divides(q: int, m: Any) -> Any:
    """``m // q`` when ``q`` divides the multiplicity ``m`` (int or monomial), else None."""
    if isinstance(m, int):
        return m // q if q > 0 and m % q == 0 else None
    import sympy

    d = sympy.cancel(m / q)
    if d.is_Integer:
        return int(d) if d > 0 else None
    coeff, _ = d.as_coeff_Mul()
    return d if coeff.is_Integer and coeff > 0 else None


def positive_quotient(prod: Any, T: Any) -> int | None:
    """``prod / T`` when it is provably a positive integer (ints or SymInts), else None."""
    if type(prod) is int and type(T) is int:
        return prod // T if T > 0 and prod > 0 and prod % T == 0 else None
    import sympy

    def expr(v: Any) -> Any:
        if isinstance(v, torch.SymInt):
            return v.node.expr
        return sympy.Integer(v) if isinstance(v, int) else None

    p, t = expr(prod), expr(T)
    if p is None or t is None or t == 0:
        return None
    q = p / t
    if not q.is_Integer:
        q = sympy.cancel(q)
    return int(q) if q.is_Integer and q > 0 else None


META = Kind("meta")
ADD = Kind("add")
NONE = Kind("none")  # no value (asserts)
BLOCKED = Kind("blocked")  # depends on a value whose rule failed: not reported again (the root cause is)
DATA_TAGS = ("row", "bag", "recv", "recvw", "seg")


#: The region cannot be shown row-local; the message names the node and why (the row analysis's one exception).
Unproven = NotRowLocal

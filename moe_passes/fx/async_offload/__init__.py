"""``async_offload``: hand router tensors that leave the graph to the host, copied asynchronously.

Routing replay and expert-load logging read every layer's routing decisions
(selected experts) and, detached, its router logits on the host. Without
this pass the user's ``.cpu()`` after the step is a blocking copy that stalls
the stream, and the device tensors returned for it stay alive until the user
drops them. This pass starts a device-to-host copy of each router output right
after the tensor is produced (``moe_passes::offload_start`` on a ``detach``ed
value) and waits for it at the end of the forward (``moe_passes::offload_wait``);
the graph returns the host tensor in place of the device one.

What the caller gets (the user-visible contract):

* every router output the pass offloads is returned as a **host tensor with the
  same values, dtype and shape** (pinned memory on CUDA), as if the caller had
  called ``.cpu()`` on it, but without a blocking copy;
* an output that **requires grad** (router logits returned as the model writes
  them, e.g. ``output_router_logits=True`` in a training step) keeps its
  gradient: the host tensor requires grad and its backward moves the gradient
  back to the device logits, exactly like ``logits.cpu()`` in eager
  (``offload_wait``'s ``grad_source``). No gradient changes, silently or not;
* what autograd needs stays as it is: the copy is taken from a ``detach`` of
  the device value, and the device value itself still feeds every consumer in
  the graph and is saved for backward where a backward formula saves it (e.g.
  ``topk`` saves its indices).

So the device buffer of an offloaded output is

* released right after the copy when nothing else needs it (detached logits
  returned for logging, any router output in an inference graph);
* kept for backward when autograd saves it (selected experts under ``topk``):
  the host copy is still delivered without a blocking copy, it just frees
  nothing on the device;
* kept until the wait when the output requires grad (the wait's gradient edge
  holds it; without the pass the caller would hold it longer, as an output).

The report says, per output, what was offloaded (node, kind, module, shape,
dtype, bytes) and which of the three happened to the device buffer, and for
every router output left alone, why.

Stage: **pre-grad**, on the Dynamo graph or on its canonical pre-dispatch ATen
re-trace (``moe_passes.ir.canonical``). Only there are the *user's* outputs
exactly the graph outputs (after AOT partitioning, forward outputs mix user
outputs with tensors saved for backward) and do nodes still carry the user's
source lines (``stack_trace``) that skip reasons name. Router tensors are recognised from data flow, never from
module or attribute names (``routers``): router logits are the values whose top-k (directly or after
softmax/sigmoid, an expert bias, casts, normalisation) gives indices that select experts, i.e. a value
computed from the indices feeds an all-to-all, grouped-GEMM offsets or split sizes, or indexes tokens or
expert weights; selected experts are those indices; views, detaches, dtype casts, ``stack``/``cat`` and
index arithmetic of each keep its label. A top-k whose indices select nothing (a balancing loss's, a
vocabulary top-k for logging) is not a router, and a graph output that comes from one is skipped with the
reason and its source line. The same rule reads Dynamo's torch IR and the ATen IR.

Which outputs (``BackendConfig.offload_targets``): ``"auto"`` offloads every
router output (kinds ``router_logits`` and ``selected_experts``); an explicit
tuple of kinds offloads only those. Skipped, each with its reason: kinds not
listed, outputs **mutated in place** after they are produced (a copy taken at
production would return stale values), outputs without a recorded value.
"""

from moe_passes.fx.async_offload.offload_pass import (
    KEPT_FOR_BACKWARD,
    KEPT_FOR_GRADIENT,
    RELEASED,
    UNKNOWN_IF_SAVED,
    AsyncOffloadPass,
    alias_root,
)
from moe_passes.fx.async_offload.routers import TARGET_KINDS, RouterAnalysis, TopkFinding, classify
from moe_passes.fx.async_offload.routers import analyse as analyse_routers

__all__ = ["AsyncOffloadPass", "KEPT_FOR_BACKWARD", "KEPT_FOR_GRADIENT", "RELEASED", "TARGET_KINDS",
           "UNKNOWN_IF_SAVED", "RouterAnalysis", "TopkFinding", "alias_root", "analyse_routers", "classify"]

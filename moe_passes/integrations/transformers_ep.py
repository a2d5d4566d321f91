"""transformers' own expert parallelism with the token exchange in one graph.

transformers 5.24 exchanges routed tokens with ``AllToAllEP`` (``DistributedConfig(ep_size=...,
ep_implementation="all_to_all")``). Between its dispatch and its combine all-to-all it branches on
the number of rows this rank received::

    if tokens.shape[0] == 0:   # keep empty rows connected to backward
        ...

That count is an unbacked size under ``torch.compile`` (it comes from ``.tolist()`` of the exchanged
counts), so Dynamo cannot decide the branch and breaks the graph there: dispatch and combine land in
different graphs and Domino cannot pair them. No compile setting decides an unbacked ``== 0`` (the
region shape does not help either: the branch sits between the two all-to-alls).

``register()`` adds one implementation to transformers' own registry
(``EPImplementationInterface``), ``ep_implementation="moe_passes_all_to_all"``: ``AllToAllEP`` with
that one test spelled ``guard_or_false(tokens.shape[0] == 0)``. In eager mode it is the same test
(the same branch runs; ``tests/test_hf_native_ep.py`` compares it with transformers' ``"all_to_all"``
run); under compile the non-empty branch is traced, which computes the same values for zero rows
too (the expert GEMMs of zero rows are zero rows; every expert weight still gets its (zero) gradient
because the compiled backward returns one for every input), so the exchange stays in one graph::

    from moe_passes.integrations.transformers_ep import register
    model = AutoModelForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(ep_size=2, fsdp_size=2, ep_implementation=register()))
    model.compile(backend="domino")     # torch._dynamo.config.capture_scalar_outputs = True (the .tolist())
"""

from __future__ import annotations

from typing import Any

NAME = "moe_passes_all_to_all"


def register() -> str:
    """Register ``moe_passes_all_to_all`` with transformers' ``EPImplementationInterface`` (idempotent);
    returns the name to pass as ``DistributedConfig(ep_implementation=...)``."""
    try:
        from transformers.distributed.expert_parallel import AllToAllEP, EPImplementationInterface
    except ImportError as e:  # transformers < 5.24 has no native expert parallelism
        raise ImportError(f"moe_passes.integrations.transformers_ep needs transformers with "
                          f"transformers.distributed.expert_parallel.AllToAllEP (5.24+): {e}") from None
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    class OneGraphAllToAllEP(AllToAllEP):
        """``AllToAllEP`` whose empty-exchange test does not break a compiled graph (module docstring)."""

        def __call__(self, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
            tokens, expert_ids, weights, state = self._dispatch_tokens(hidden_states, top_k_index, top_k_weights)
            if guard_or_false(tokens.shape[0] == 0):
                expert_output = self.experts_forward(
                    tokens.sum(dim=0, keepdim=True), expert_ids.new_zeros((1, 1)), weights.new_ones((1, 1))
                )[:0]
            else:
                expert_output = self.experts_forward(tokens, expert_ids, weights)
            return self._combine_tokens(expert_output, state)

    EPImplementationInterface.register(NAME, OneGraphAllToAllEP)
    return NAME

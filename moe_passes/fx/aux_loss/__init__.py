"""Layer-wise aux loss: router-logit losses become per-layer partial sums inside each layer.

One idea per module, on the canonical pre-dispatch ATen IR (``moe_passes.ir.canonical``):

* ``semantics``  -- what each ATen op means for rows of tokens (schemas, tags, normalised dims);
* ``recognise``  -- router logits, stacked (``cat``/``stack``) and per-layer (loop) losses, by meaning;
* ``rewrite``    -- proves a loss is row-local then summed over rows, and emits it per layer;
* ``stats``      -- per-layer statistics: counts without one-hot, logsumexp grad from the router's
                    softmax, reuse of the router's softmax/top-k only where provably the same numbers;
* ``placement``  -- each layer's partial sums at the end of that layer, never across an in-place write;
* ``layerwise``  -- the pass (``LayerwiseAuxLossPass``): orchestration, reasons, fail-closed.

Regional compile (each decoder layer compiled on its own): the loss then lives in the model's
own forward. If that code is compiled (``torch.compile`` of the loss function, or of the
top level with the layers compiled apart), the pass sees every layer's router logits as graph
inputs and rewrites the stacked loss into per-layer reductions over those inputs (no ``cat``,
no stacked softmax or one-hot; nothing to reuse since no router is in that graph). A loss left
in eager code is not seen by any backend; a per-layer (loop-form) loss over graph inputs is
already per layer and is reported as such.
"""

from moe_passes.fx.aux_loss.layerwise import LayerwiseAuxLossPass

__all__ = ["LayerwiseAuxLossPass"]

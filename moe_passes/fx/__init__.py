"""The passes over torch.fx graphs, one package or module a pass: ``domino`` (Domino EP),
``aux_loss`` (layer-wise router aux loss), ``async_offload``.  The machinery that runs
them lives in ``moe_passes.pipeline``, the vocabulary they read in ``moe_passes.ir``.
Nothing here imports Inductor."""

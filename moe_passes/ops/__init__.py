"""Graph vocabulary: custom ops that passes insert into FX graphs (no Inductor import here).

``moe_passes.ops.offload``: ``moe_passes::offload_start`` / ``moe_passes::offload_wait``, the
asynchronous device-to-host copy that ``moe_passes.fx.async_offload`` inserts.
"""

"""Deprecated location: the graph vocabulary lives in ``moe_passes.ir.facts``.

Kept only so code written against the old path keeps importing; new code imports
``moe_passes.ir.facts``. Nothing here is defined twice.
"""

from moe_passes.ir.facts import (  # noqa: F401
    ALL_TO_ALL_OPS,
    COLLECTIVE_NAMESPACES,
    WAIT_OPS,
    ModuleRegion,
    collective_kind,
    collective_nodes,
    find_module_regions,
    group_by_module,
    is_all_to_all,
    is_collective,
    is_topk,
    is_wait,
    module_path,
    module_types,
    op_namespace_and_name,
    wait_nodes,
    waits_of,
)

MoERegion = ModuleRegion
find_moe_regions = find_module_regions

"""The one vocabulary of graph facts every pass imports, one topic per module.

Passes, the memory estimate, the scheduler and the CLI all ask the same
questions of an FX graph: what value does this node carry, is it a
collective (and which), where is its wait, does it write one of its inputs,
which module does it belong to, what does a (possibly negative) dim mean.
They are answered here, once, by meaning rather than by spelling, in both IRs
a pass can meet:

* torch IR (Dynamo's graph: ``torch.softmax``, ``Tensor.softmax`` methods,
  ``OpOverloadPacket`` targets, ``example_value`` metadata), and
* ATen IR (the canonical pre-dispatch re-trace of ``moe_passes.ir.canonical``
  and Inductor's post-grad graphs: ``OpOverload`` targets with schemas,
  ``val`` metadata).

Mutation is read from schemas (``alias_info.is_write``) where there is one;
for torch-IR methods it falls back to PyTorch's naming rule (a trailing
underscore) and to the in-place operator functions.

Topics: ``values`` (node values, shapes, dims), ``ops`` (op identity, arguments by schema,
pointwise/pure), ``collectives`` (collectives and waits), ``mutation`` (writes and aliases),
``modules`` (module paths, node order). Every name is importable from here.
"""

from moe_passes.ir.facts.collectives import *  # noqa: F403
from moe_passes.ir.facts.collectives import _functional_collective_name  # noqa: F401
from moe_passes.ir.facts.modules import *  # noqa: F403
from moe_passes.ir.facts.mutation import *  # noqa: F403
from moe_passes.ir.facts.ops import *  # noqa: F403
from moe_passes.ir.facts.values import *  # noqa: F403

"""Reference models the passes are proven on: ``moe_passes.models.interns1_vl``.

In the repository they live in the top-level ``models/`` folder (the layout keeps them apart from
the library); installed, they sit under this package, so no global ``models`` name is taken in
site-packages. From a source tree (``PYTHONPATH=$PWD``, editable install) this package's path is
extended to that folder.
"""

import os as _os

_repo_models = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))), "models")
if _os.path.isdir(_os.path.join(_repo_models, "interns1_vl")) and _repo_models not in __path__:
    __path__.append(_repo_models)

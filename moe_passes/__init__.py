"""moe_passes: a torch.compile backend for MoE vision-language training.

    model = torch.compile(model, backend=domino_backend)
    model = torch.compile(model, backend=make_backend(num_chunks=4))
    model = torch.compile(model, backend="domino")

``backend="domino"`` is the process-wide ``domino_backend`` (default config): its
``reports`` collect every graph compiled with it in this process until
``domino_backend.clear_reports()``; ``make_backend(...)`` gives a backend (and
reports) of your own. Logs: ``logging.getLogger("moe_passes")`` and, per module,
``moe_passes.pipeline.manager``, ``moe_passes.inductor.backend``, ...
"""

from __future__ import annotations

from typing import Any

from moe_passes.config import BackendConfig

__all__ = ["BackendConfig", "DominoBackend", "domino_backend", "make_backend"]


def __getattr__(name: str) -> Any:
    if name in ("DominoBackend", "domino_backend", "make_backend"):
        from moe_passes.inductor import backend

        return getattr(backend, name)
    raise AttributeError(name)

"""Readable, normalised graph text: stable across runs and machines.

Goldens and the diff CLI compare these strings, so anything that shifts
between runs (memory addresses, source paths and line numbers, counters in
generated names, unbacked-symbol numbering) is normalised away.
"""

from __future__ import annotations

import re

import torch.fx as fx

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_FILE_LINE = re.compile(r"File: [^\n]*?:\d+")
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_UNBACKED = re.compile(r"\bu(\d+)\b")
_SOURCE_COMMENT = re.compile(r"^\s*#.*$\n?", re.MULTILINE)


def normalize_text(text: str) -> str:
    """Strip addresses, source locations, comments; renumber unbacked symbols in order of appearance."""
    text = _ADDRESS.sub("0xADDR", text)
    text = _FILE_LINE.sub("File: <loc>", text)
    text = _SOURCE_COMMENT.sub("", text)
    mapping: dict[str, str] = {}

    def renumber(m: re.Match[str]) -> str:
        return mapping.setdefault(m.group(0), f"u{len(mapping)}")

    text = _UNBACKED.sub(renumber, text)
    return _TRAILING_WS.sub("", text).strip() + "\n"


def graph_text(gm: fx.GraphModule | fx.Graph) -> str:
    """The graph as readable Python (``print_readable`` without colours), normalised."""
    if isinstance(gm, fx.Graph):
        gm = fx.GraphModule(gm.owning_module or {}, gm)
    text = gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)
    return normalize_text(text)

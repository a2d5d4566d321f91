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
_BACKED = re.compile(r"\bs(\d+)\b")
_SOURCE_COMMENT = re.compile(r"^\s*#.*$\n?", re.MULTILINE)
_EVAL_WITH_KEY = re.compile(r"<eval_with_key>\.\d+")
_RESUME_AT_LINE = re.compile(r"(torch_dynamo_resume_in_\w+?_at_)\d+")
_INDUCTOR_PATH = re.compile(r"/[^\s'\"]*torchinductor[^\s'\"]*")
_INDUCTOR_HASH = re.compile(r"\b[a-z0-9]{52}\b")


def _renumber(pattern: re.Pattern[str], prefix: str, text: str) -> str:
    """Rename symbols in order of first appearance, so a shifted global counter changes nothing."""
    mapping: dict[str, str] = {}

    def rename(m: re.Match[str]) -> str:
        return mapping.setdefault(m.group(0), f"{prefix}{len(mapping)}")

    return pattern.sub(rename, text)


def normalize_text(text: str) -> str:
    """Strip addresses, source locations, comments, counters; renumber symbols in order of appearance."""
    text = text.replace("\r\n", "\n")
    text = _ADDRESS.sub("0xADDR", text)
    text = _FILE_LINE.sub("File: <loc>", text)
    text = _SOURCE_COMMENT.sub("", text)
    text = _EVAL_WITH_KEY.sub("<eval_with_key>.N", text)
    text = _RESUME_AT_LINE.sub(r"\1N", text)
    text = _renumber(_UNBACKED, "u", text)
    text = _renumber(_BACKED, "s", text)
    return _TRAILING_WS.sub("", text).strip() + "\n"


def normalize_output_code(code: str) -> str:
    """Inductor output code without cache paths and content hashes (they differ per machine and run)."""
    code = _INDUCTOR_PATH.sub("<inductor-cache>", code)
    code = _INDUCTOR_HASH.sub("<hash>", code)
    return normalize_text(code)


def graph_text(gm: fx.GraphModule | fx.Graph) -> str:
    """The graph as readable Python (``print_readable`` without colours), normalised."""
    if isinstance(gm, fx.Graph):
        gm = fx.GraphModule(gm.owning_module or {}, gm)
    text = gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)
    return normalize_text(text)

"""JSON text on the hot paths: orjson (compact, UTF-8), with the standard library for what orjson refuses.

orjson writes a dict of a few dozen fields several times faster than `json.dumps`; it refuses str with
lone surrogates and integers past 64 bits. For those the standard library writes the text with ASCII
escapes (`\\udXXX`), so what reaches Redis is valid UTF-8 whatever the input held.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumpb(obj: Any) -> bytes:
    """`obj` as compact UTF-8 JSON bytes."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError: a lone surrogate, a big integer, a type orjson does not know
        return json.dumps(obj, separators=(",", ":")).encode()


def dumps(obj: Any) -> str:
    """`obj` as compact JSON text."""
    return dumpb(obj).decode()

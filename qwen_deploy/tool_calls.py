"""Tool calls and reasoning in a model's output: the forced-call schema, the parsers, the stream split.

Pure Python (no torch): the worker parses a finished sample, the web layer splits a stream as it arrives.
A stored request carries `tools` (OpenAI's `[{"type": "function", "function": {name, description,
parameters}}]`), `tool_choice` (`none`, `auto`, `required` or `{"type": "function", "function":
{"name"}}`) and `parallel_tool_calls`. A call is kept in OpenAI's shape: `{"id": "call_…", "type":
"function", "function": {"name", "arguments": <JSON text>}}`.

- `required` and a named function are forced: the worker constrains the sample to `forced_schema` (one
  `{"name", "arguments"}` object, or a list of 1 to 8 when parallel calls are allowed), so the arguments
  always validate against the function's schema; `parse_forced` reads that JSON.
- `auto` reads the model's own format (`parse_auto`): Qwen/Hermes `<tool_call>{…}</tool_call>` blocks
  anywhere in the text, or a whole output that is Llama 3's JSON call `{"name", "parameters"}` (or a
  list of them) naming a given function. Any other text stays content.
- Reasoning (`split_reasoning`): text up to `</think>` (after an opening `<think>`, or all of it when the
  prompt opened the block) is the reasoning; the rest is the content.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CLOSE) + r"|\Z)", re.S)
MAX_PARALLEL_CALLS = 8  # a forced list of calls ends by then (a small model may otherwise never close it)
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or []]


def mode(request: dict[str, Any]) -> str:
    """`none`, `auto`, `required` or `function` (a named function) for a stored request."""
    if not request.get("tools"):
        return "none"
    choice = request.get("tool_choice", "auto")
    return "function" if isinstance(choice, dict) else str(choice)


def forced_schema(request: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a forced tool call is generated under; None unless `required` or named."""
    kind = mode(request)
    if kind not in ("required", "function"):
        return None
    tools = request["tools"]
    if kind == "function":
        name = request["tool_choice"]["function"]["name"]
        tools = [t for t in tools if t["function"]["name"] == name]
    items = [_call_schema(t["function"]) for t in tools]
    one = items[0] if len(items) == 1 else {"anyOf": items}
    if kind == "required" and request.get("parallel_tool_calls", True):
        return {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}
    return one


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": function.get("parameters") or NO_ARGUMENTS},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def make_call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def parse_forced(text: str) -> list[dict[str, Any]]:
    """The calls in a forced sample (a `{"name", "arguments"}` object or a list); [] when it is cut short."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    return [make_call(i["name"], i["arguments"]) for i in items if isinstance(i, dict) and "name" in i]


def _as_call(value: Any, names: list[str] | None) -> dict[str, Any] | None:
    """A `{"name", "arguments" | "parameters"}` object as a call (its name among `names` when given)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if names is not None and value["name"] not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return make_call(value["name"], args)


def parse_auto(text: str, names: list[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of a sample under `tool_choice: auto`; content is None when there is none."""
    calls: list[dict[str, Any]] = []
    if TOOL_OPEN in text:
        parts, at = [], 0
        for match in _BLOCK.finditer(text):
            try:
                call = _as_call(json.loads(match.group(1)), None)
            except ValueError:
                call = None
            if call is None:
                continue  # not a call: left in the content
            calls.append(call)
            parts.append(text[at : match.start()])
            at = match.end()
        parts.append(text[at:])
        rest = parts[0] + "".join(p for p in parts[1:] if p.strip())  # no gaps left between the calls
        return (rest if rest.strip() else None), calls
    stripped = text.strip()
    if stripped[:1] in ("{", "["):  # Llama 3: the whole output is the JSON call (or a list of them)
        try:
            value = json.loads(stripped)
        except ValueError:
            return text or None, []
        items = value if isinstance(value, list) else [value]
        found = [_as_call(item, names) for item in items]
        if items and all(c is not None for c in found):
            return None, [c for c in found if c is not None]
    return text or None, []


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning, content): the reasoning ends at `</think>`; it starts at a leading `<think>`, or at the
    start of the text when the prompt opened the block (`opened`). A block cut short is all reasoning."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        body, opened = stripped[len(THINK_OPEN) :], True
    else:
        body = text
    if THINK_CLOSE in body:
        reasoning, _, content = body.partition(THINK_CLOSE)
        return reasoning.strip("\n"), content.lstrip()
    if opened:
        return body.strip("\n"), ""
    return None, text


def _held(text: str, marker: str) -> str:
    """`text` without a tail that could begin `marker` (it may be completed by the next delta)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return text[:-k]
    return text


def visible(text: str, tool_mode: str) -> tuple[str, str]:
    """(reasoning, content) of a partial sample that can be streamed now: never a part that a later delta
    could turn into a tool call or a `</think>`, and no content at all for a forced call. Reasoning is
    streamed apart when the sample opens with `<think>` (as Qwen3 writes it)."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN) or THINK_OPEN.startswith(stripped):
        body = stripped[len(THINK_OPEN) :] if stripped.startswith(THINK_OPEN) else ""
        if THINK_CLOSE not in body:
            return _held(body, THINK_CLOSE).strip("\n"), ""
        reasoning, _, content = body.partition(THINK_CLOSE)
        reasoning, content = reasoning.strip("\n"), content.lstrip()
    else:  # a block the prompt opened is known only at the end (the worker's split), so this is content
        reasoning, content = "", text
    if tool_mode in ("required", "function"):
        return reasoning, ""
    if tool_mode == "auto":
        if content.lstrip()[:1] in ("{", "["):
            return reasoning, ""  # may be a JSON call: known at the end
        content = _held(content.split(TOOL_OPEN, 1)[0], TOOL_OPEN)
    return reasoning, content


def parse_sample(text: str, request: dict[str, Any], reasoning: bool, opened: bool = False) -> dict[str, Any]:
    """A finished sample's `content`, `reasoning_content` (when `reasoning`) and `tool_calls` (when a tool
    mode is on), as the worker stores them beside the raw `text`."""
    out: dict[str, Any] = {}
    content: str | None = text
    if reasoning:
        thought, content = split_reasoning(text, opened)
        out["reasoning_content"] = thought
    kind = mode(request)
    if kind in ("required", "function"):
        calls = parse_forced(content or "")
        out["tool_calls"] = calls
        content = None if calls else content
    elif kind == "auto":
        content, calls = parse_auto(content or "", tool_names(request.get("tools")))
        out["tool_calls"] = calls[:1] if request.get("parallel_tool_calls") is False else calls
    out["content"] = content
    return out


def template_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for `apply_chat_template`: a call's JSON `arguments` text as an object (the templates of
    Qwen and Llama write it with `tojson`), a missing content as ""."""
    out = []
    for msg in messages:
        msg = dict(msg)
        if msg.get("content") is None:
            msg["content"] = ""
        if msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                function = dict(call["function"])
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except (TypeError, ValueError):
                    pass
                calls.append({**call, "function": function})
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def fallback_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Messages for a chat template that knows no tools: the functions are described in the system message
    (Qwen's convention: answer with `<tool_call>` blocks), an assistant's calls become those blocks in its
    text, and a tool's result a user message in `<tool_response>` tags."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        content = msg.get("content") or ""
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            blocks = [
                f"{TOOL_OPEN}\n"
                + json.dumps({"name": c["function"]["name"], "arguments": _loaded(c["function"]["arguments"])})
                + f"\n{TOOL_CLOSE}"
                for c in msg["tool_calls"]
            ]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [content, *blocks]))})
        elif msg["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": msg["role"], "content": content})
    if tools:
        described = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = (
            "You may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{described}\n"
            "</tools>\n\nFor each function call, return a json object with function name and arguments within "
            f'{TOOL_OPEN}{TOOL_CLOSE} XML tags:\n{TOOL_OPEN}\n{{"name": <function-name>, "arguments": '
            f"<args-json-object>}}\n{TOOL_CLOSE}"
        )
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _loaded(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments

"""Golden cases: loading a golden JSONL file, and judging outputs against the cases' schemas.

Strategy: a golden file is JSON Lines, one chat case per line; blank lines are skipped. Loading is
strict (unknown keys are errors, so a typo is not a silently dropped field) and every problem names
its line number, because the file is hand-written and the parity tool must answer bad input with a
clear message, never a traceback. Schemas (tool parameters, json_schema response formats) are checked
when loaded and compiled once into `jsonschema` validators that the case keeps.

A line looks like::

    {"id": "weather-1",
     "messages": [{"role": "user", "content": "Weather in Oslo?"}],
     "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}],
     "tool_choice": "auto",
     "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}},
     "params": {"temperature": 0, "top_p": 1, "max_tokens": 64, "seed": 7}}

Only `id` and `messages` are required. `params` holds the pinned sampling parameters and any vendor
extra (sent as-is in the request body). Judging is synchronous and pure: `check_tool_calls` and
`check_structured` return (valid, problems) so a report can show why an output failed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

_CASE_KEYS = frozenset({"id", "messages", "tools", "tool_choice", "response_format", "params", "note"})
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# Sampling parameters a migration should pin explicitly (defaults differ between serving stacks).
PINNED = ("temperature", "top_p", "max_tokens", "seed")


class GoldenError(ValueError):
    """A golden file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ToolCall:
    """One tool call as emitted by a model: the function name and its raw argument string."""

    name: str
    arguments: str


@dataclass(frozen=True)
class GoldenCase:
    """One golden chat case, validated, with its schemas compiled."""

    id: str
    line: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    _tool_validators: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _output_validator: Any = field(default=None, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """'tools', 'json_schema' or 'chat'."""
        if self.tools:
            return "tools"
        if self._output_validator is not None:
            return "json_schema"
        return "chat"

    def unpinned(self) -> list[str]:
        """The sampling parameters in `PINNED` that this case leaves to the server's defaults."""
        return [name for name in PINNED if name not in self.params]


def load_golden(path: str | Path) -> list[GoldenCase]:
    """Read and validate a golden JSONL file. Raises GoldenError naming the file and line."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GoldenError(f"golden file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GoldenError(f"cannot read golden file {p}: {exc}") from None
    cases: list[GoldenCase] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(raw.splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{p}:{number}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GoldenError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        case = _parse_case(obj, number, where)
        if case.id in seen:
            raise GoldenError(f"{where}: duplicate id {case.id!r} (first on line {seen[case.id]})")
        seen[case.id] = number
        cases.append(case)
    if not cases:
        raise GoldenError(f"{p}: no golden cases (expected one JSON object per line)")
    return cases


def _parse_case(obj: Any, number: int, where: str) -> GoldenCase:
    if not isinstance(obj, dict):
        raise GoldenError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _CASE_KEYS)
    if unknown:
        raise GoldenError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_CASE_KEYS))}")
    case_id = obj.get("id")
    if not isinstance(case_id, str) or not case_id:
        raise GoldenError(f"{where}: 'id' must be a non-empty string")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GoldenError(f"{where}: 'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
            raise GoldenError(f"{where}: messages[{i}] needs a 'role' of {', '.join(sorted(_ROLES))}")
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise GoldenError(f"{where}: 'params' must be an object")
    for reserved in ("model", "messages", "stream", "tools", "response_format"):
        if reserved in params:
            raise GoldenError(f"{where}: params.{reserved} is set by the tool or the case, not by params")
    tools, tool_validators = _parse_tools(obj.get("tools"), where)
    response_format, output_validator = _parse_response_format(obj.get("response_format"), where)
    note = obj.get("note", "")
    return GoldenCase(
        id=case_id, line=number, messages=messages, tools=tools, tool_choice=obj.get("tool_choice"),
        response_format=response_format, params=params, note=str(note),
        _tool_validators=tool_validators, _output_validator=output_validator,
    )


def _compile(schema: Any, where: str, what: str) -> Any:
    if not isinstance(schema, dict):
        raise GoldenError(f"{where}: {what} must be a JSON schema object")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise GoldenError(f"{where}: {what} is not a valid JSON schema: {exc.message}") from None
    return cls(schema)


def _parse_tools(tools: Any, where: str) -> tuple[list[dict[str, Any]] | None, dict[str, Any]]:
    if tools is None:
        return None, {}
    if not isinstance(tools, list) or not tools:
        raise GoldenError(f"{where}: 'tools' must be a non-empty list")
    validators: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise GoldenError(f"{where}: tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise GoldenError(f"{where}: tools[{i}].function.name must be a non-empty string")
        schema = fn.get("parameters", {"type": "object"})
        validators[name] = _compile(schema, where, f"tools[{i}].function.parameters")
    return tools, validators


def _parse_response_format(rf: Any, where: str) -> tuple[dict[str, Any] | None, Any]:
    if rf is None:
        return None, None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise GoldenError(f"{where}: response_format.type must be text, json_object or json_schema")
    if rf["type"] != "json_schema":
        return rf, None
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name"), str):
        raise GoldenError(f"{where}: response_format.json_schema needs a 'name' and a 'schema'")
    return rf, _compile(js.get("schema"), where, "response_format.json_schema.schema")


def _first_error(validator: Any, instance: Any) -> str | None:
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is None:
        return None
    path = "".join(f"[{p!r}]" for p in error.absolute_path)
    return f"{path or '(root)'}: {error.message}"


def check_tool_calls(case: GoldenCase, calls: list[ToolCall]) -> tuple[bool | None, list[str]]:
    """Judge a response's tool calls against the case's tools.

    Valid means at least one call, and every call names a declared tool whose arguments parse as
    JSON and validate against that tool's parameter schema. None when the case declares no tools.
    """
    if not case.tools:
        return None, []
    if not calls:
        return False, ["no tool call in the response"]
    problems: list[str] = []
    for call in calls:
        validator = case._tool_validators.get(call.name)
        if validator is None:
            problems.append(f"{call.name}: not a declared tool")
            continue
        try:
            args = json.loads(call.arguments or "")
        except json.JSONDecodeError as exc:
            problems.append(f"{call.name}: arguments are not JSON ({exc.msg} at column {exc.colno})")
            continue
        error = _first_error(validator, args)
        if error:
            problems.append(f"{call.name}: {error}")
    return not problems, problems


def check_structured(case: GoldenCase, text: str) -> tuple[bool | None, list[str]]:
    """Judge message content against the case's json_schema response format (None if it has none)."""
    if case._output_validator is None:
        return None, []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return False, [f"content is not JSON ({exc.msg} at column {exc.colno})"]
    error = _first_error(case._output_validator, value)
    return (False, [error]) if error else (True, [])

"""msgspec's validation errors in OpenAI's words: the message and the ``param`` an SDK shows.

Strategy: schemas.py states every rule as a type or a ``Meta`` constraint, so msgspec finds the
failure in C; this module turns its one-line ``ValidationError`` ("Expected `int` >= 1 - at
`$.n`") into OpenAI's 400 ``invalid_request_error`` with the field named by its path
(``tools[0].function.name``), matched by a handful of patterns. A ``__post_init__`` check raises
"@field message" to name a field msgspec cannot. A body that is not a JSON object gets OpenAI's
"could not parse" message, param null. `SUPPORTED` lists the allowed values per field for "Invalid
value" messages: keep it in sync with schemas.py's Literals and tags.
"""

from __future__ import annotations

import re

import msgspec

from proxy.errors import ApiError, invalid_request

NOT_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. "
    "If you have trouble figuring out how to fix this, please contact us through our help center at "
    "help.openai.com.)"
)

# Supported values, by param with indices removed, for "Invalid value" messages.
SUPPORTED = {
    "messages[].role": ("system", "developer", "user", "assistant", "tool", "function"),
    "tools[].type": ("function",),
    "tool_choice": ("none", "auto", "required"),
    "tool_choice.type": ("function",),
    "response_format.type": ("text", "json_object", "json_schema", "structural_tag"),
    "encoding_format": ("float", "base64"),
}
_TYPE_WORDS = {
    "str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
    "array": "an array", "object": "an object", "null": "null",
}
_AT = re.compile(r"(.*) - at `(\$[^`]*)`", re.DOTALL)
_MISSING = re.compile(r"Object missing required field `([^`]+)`")
_TYPE = re.compile(r"Expected `([^`]+)`, got `([^`]+)`")
_BOUND = re.compile(r"Expected `(\w+)` (of length )?(>=|<=|>|<) (\S+)")
_PATTERN = re.compile(r"Expected `str` matching regex '(.*)'", re.DOTALL)
_VALUE = re.compile(r"Invalid (?:enum )?value (.*)", re.DOTALL)
_INDEX = re.compile(r"\[\d+\]")
_MAX_ECHO = 80


def param_from_path(msgspec_error_path: str) -> str | None:
    """msgspec's error path to OpenAI's ``param``: ``$.tools[0].function.name`` -> ``tools[0].function.name``.

    ``$`` (the body itself) gives None. A path of a sub-document (``$[2]``) keeps its index: ``[2]``.
    """
    return msgspec_error_path.removeprefix("$").removeprefix(".") or None


def _join(base: str | None, tail: str | None) -> str | None:
    if not (base and tail):
        return base or tail
    return base + tail if tail.startswith("[") else f"{base}.{tail}"


def quote(value: str) -> str:
    """A value echoed in a message, cut to a readable length."""
    return value if len(value) <= _MAX_ECHO else value[:_MAX_ECHO] + "...'"


def _types(spec: str) -> str:
    words = [_TYPE_WORDS.get(t, t) for t in spec.split(" | ") if t != "null"] or ["null"]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def from_validation_error(exc: msgspec.ValidationError, prefix: str | None = None) -> ApiError:
    """The one translation of a msgspec ValidationError into OpenAI's wording and ``param``."""
    text = str(exc)
    m = _AT.fullmatch(text)
    detail, path = (m.group(1), m.group(2)) if m else (text, "$")
    param = _join(prefix, param_from_path(path))
    if param is None and detail.startswith("Expected `object`"):
        return invalid_request(NOT_JSON)
    name = f"'{param}'" if param else "the request body"
    if detail.startswith("@"):  # raised by a __post_init__: "@field message with {param}"
        field, _, message = detail[1:].partition(" ")
        param = _join(param, field)
        return invalid_request(message.replace("{param}", str(param)), param)
    if m := _MISSING.fullmatch(detail):
        param = _join(param, m.group(1))
        return invalid_request(f"Missing required parameter: '{param}'.", param)
    if m := _TYPE.fullmatch(detail):
        expected, got = _types(m.group(1)), _types(m.group(2))
        return invalid_request(f"Invalid type for {name}: expected {expected}, but got {got} instead.", param)
    if m := _BOUND.fullmatch(detail):
        kind, of_length, op, limit = m.groups()
        limit = limit.removesuffix(".0")
        if of_length and op == ">=" and limit == "1":
            what = "array" if kind == "array" else "string"
            message = (f"Invalid {name}: empty {what}. Expected {_types(kind)} with minimum length 1, "
                       f"but got an empty {what} instead.")
        elif of_length:
            message = f"Invalid {name}: expected {_types(kind)} of length {op} {limit}."
        else:
            message = f"Invalid {name}: expected a value {op} {limit}."
        return invalid_request(message, param)
    if m := _PATTERN.fullmatch(detail):
        pattern = m.group(1).replace("\\\\", "\\").replace("\\Z", "$")
        return invalid_request(f"Invalid {name}: string does not match pattern. Expected a string that "
                               f"matches the pattern '{pattern}'.", param)
    if m := _VALUE.fullmatch(detail):
        message = f"Invalid value for {name}: {quote(m.group(1))}."
        supported = SUPPORTED.get(_INDEX.sub("[]", param or ""))
        if supported:
            message += " Supported values are: " + ", ".join(f"'{v}'" for v in supported) + "."
        return invalid_request(message, param)
    return invalid_request(f"Invalid {name}: {quote(detail)}.", param)

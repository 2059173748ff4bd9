"""xLAM tool descriptions as the JSON schemas HF chat templates take.

xLAM gives each parameter a free-form type such as ``"str, optional"`` or
``"List[int]"``. These map to JSON types: str -> string, int -> integer, float ->
number, bool -> boolean, List[..] / tuple / set -> array with ``items`` when known,
Dict / object -> object, unions -> a list of types, anything else -> no ``type`` and
the original text in the description. A parameter is required unless its type says
optional (``"optional"``, ``Optional[..]``, a union with None) or it has a ``default``
(kept in the schema). A tool whose parameters are already a JSON schema is kept as is.
"""

from __future__ import annotations

import re
from typing import Any

_SIMPLE_TYPES = {
    "str": "string",
    "string": "string",
    "text": "string",
    "char": "string",
    "bytes": "string",
    "date": "string",
    "datetime": "string",
    "path": "string",
    "url": "string",
    "int": "integer",
    "integer": "integer",
    "long": "integer",
    "float": "number",
    "number": "number",
    "double": "number",
    "decimal": "number",
    "numeric": "number",
    "bool": "boolean",
    "boolean": "boolean",
    "list": "array",
    "array": "array",
    "tuple": "array",
    "set": "array",
    "sequence": "array",
    "iterable": "array",
    "dict": "object",
    "object": "object",
    "mapping": "object",
    "map": "object",
    "json": "object",
    "none": "null",
    "null": "null",
    "nonetype": "null",
}
_GENERIC = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(?:\[(.*)\])?\s*", re.DOTALL)
_UNION_SEPARATOR = re.compile(r"\s+or\s+|\s*\|\s*", re.IGNORECASE)
_OPTIONAL_WORD = re.compile(r"\boptional\b", re.IGNORECASE)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts]


def _union(schemas: list[dict | None]) -> dict | None:
    types = [schema.get("type") for schema in schemas if schema]
    if len(types) != len(schemas) or not types:
        return None
    types = [t for t in dict.fromkeys(types) if t != "null"] or ["null"]
    if set(types) == {"integer", "number"}:
        return {"type": "number"}
    return {"type": types[0]} if len(types) == 1 else {"type": types}


def _parse_type(text: str, depth: int = 0) -> dict | None:
    """JSON schema fragment for a free-form type, or None when it is not understood."""
    if depth > 4:
        return None
    alternatives = _UNION_SEPARATOR.split(text.strip())
    if len(alternatives) > 1 and all(alternatives):
        return _union([_parse_type(alt, depth + 1) for alt in alternatives])
    match = _GENERIC.fullmatch(text)
    if match is None:
        return None
    head = match.group(1).lower().rsplit(".", 1)[-1]
    inner = match.group(2)
    if head == "optional" and inner:
        return _parse_type(inner, depth + 1)
    if head == "union" and inner:
        return _union([_parse_type(part, depth + 1) for part in _split_top_level(inner)])
    base = _SIMPLE_TYPES.get(head)
    if base is None:
        return None
    schema: dict = {"type": base}
    if base == "array" and inner:
        items = [_parse_type(part, depth + 1) for part in _split_top_level(inner)]
        items = [item for item in items if item is not None]
        if items and all(item == items[0] for item in items):
            schema["items"] = items[0]
    return schema


def _mentions_none(text: str) -> bool:
    return bool(re.search(r"\bnone\b|\bnull\b", text, re.IGNORECASE))


def xlam_param_schema(type_text: Any) -> tuple[dict, bool]:
    """``(schema, optional)`` for a free-form xLAM type such as ``"List[int], optional"``."""
    if not isinstance(type_text, str):
        return {}, False
    optional = bool(_OPTIONAL_WORD.search(type_text)) or _mentions_none(type_text)
    head = _split_top_level(type_text)[0] if type_text.strip() else ""
    if head.lower() == "optional":  # e.g. "optional, int"
        rest = _split_top_level(type_text)[1:]
        head = rest[0] if rest else ""
    schema = _parse_type(head) if head else None
    return (schema or {}), optional


def xlam_tool_to_schema(tool: dict) -> dict:
    """An xLAM tool as ``{"type": "function", "function": {...JSON schema...}}``."""
    parameters = tool.get("parameters") or {}
    if parameters.get("type") == "object" and isinstance(parameters.get("properties"), dict):
        json_parameters = parameters  # already JSON-schema shaped
    else:
        properties: dict[str, dict] = {}
        required: list[str] = []
        for name, spec in parameters.items():
            spec = spec if isinstance(spec, dict) else {"type": spec}
            type_text = spec.get("type")
            schema, optional = xlam_param_schema(type_text)
            prop = dict(schema)
            description = str(spec.get("description") or "").strip()
            if not schema and isinstance(type_text, str) and type_text.strip():
                description = f"{description} (type: {type_text.strip()})".strip()
            if description:
                prop["description"] = description
            if "default" in spec:
                prop["default"] = spec["default"]
                optional = True
            properties[name] = prop
            if not optional:
                required.append(name)
        json_parameters = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {
            "name": tool["name"],
            "description": str(tool.get("description") or ""),
            "parameters": json_parameters,
        },
    }

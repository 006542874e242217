"""Turn pydantic's validation errors into located, readable recipe problems."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from builder.errors import Location, Problem
from builder.recipe.model import UNION_TAGS
from builder.recipe.yamlsource import dotted, key_mark_of, mark_of, shown

__all__ = ["dotted", "problems_from"]


TYPE_NAMES = ((bool, "a boolean"), (dict, "a mapping"), (list, "a list"), (str, "a string"),
              (int, "an integer"), (float, "a number"), (type(None), "null"))


def _type_name(value: Any) -> str:
    """How a message names a value's type (bool before int: True is an int too)."""
    return next((name for kind, name in TYPE_NAMES if isinstance(value, kind)),
                type(value).__name__)


def _model_at(model: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that describes the mapping at ``path`` (for key suggestions)."""
    current: Any = model
    for step in path:
        if isinstance(step, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(step)
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0]
        elif origin is list:
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation


def _message(error: dict[str, Any], model: type[BaseModel], path: tuple[Any, ...]) -> str:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _model_at(model, path[:-1])
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(path[-1]), known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else (
            f" (known keys: {', '.join(known)})" if known else "")
        return f"unknown key {shown(path[-1])}{hint}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')} (got {shown(value)})"
    if kind in ("string_type", "str_type"):
        return f"must be a string (got {_type_name(value)})"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer (got {shown(value)})"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {shown(value)})"
    if kind == "list_type":
        return f"must be a list (got {_type_name(value)})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping (got {_type_name(value)})"
    if kind == "string_pattern_mismatch":
        return f"{shown(value)} does not match the pattern {ctx.get('pattern')}"
    if kind in ("greater_than_equal", "greater_than"):
        return f"must be at least {ctx.get('ge', ctx.get('gt'))} (got {shown(value)})"
    return error["msg"].removeprefix("Value error, ")[:200]


def without_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A location without the tags of tagged unions (``uefi_data``'s ``<keys>``...): they
    are no keys of the recipe. Only the step right after the union's own field is a tag; a
    key of the same name anywhere else is the user's."""
    return tuple(step for i, step in enumerate(loc)
                 if not (i and step in UNION_TAGS.get(loc[i - 1], ())))


def problems_from(exc: ValidationError, model: type[BaseModel], data: Any,
                  prefix: tuple[Any, ...] = ()) -> list[Problem]:
    problems = []
    for error in exc.errors():
        path = without_union_tags(tuple(error["loc"]))
        full = prefix + path
        if error["type"] == "extra_forbidden":
            where = key_mark_of(data, path)
        else:
            where = mark_of(data, path)
        problems.append(Problem(where or Location("<recipe>"), dotted(full),
                                _message(error, model, path)))
    return problems

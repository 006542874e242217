"""YAML loading that remembers where every key and value came from.

Mappings load as :class:`LocDict` and sequences as :class:`LocList`; both carry the
:class:`~builder.errors.Location` of themselves and of each of their entries, so any error
found later (schema, templating, AWS rules) can name file, line and column.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from builder.errors import Location, Problem, RecipeError


class LocDict(dict):
    """A dict that knows the location of itself and of each key."""

    def __init__(self, *args: Any, mark: Location | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mark = mark or Location("<unknown>")
        self.key_marks: dict[Any, Location] = {}
        self.value_marks: dict[Any, Location] = {}


class LocList(list):
    """A list that knows the location of itself and of each item."""

    def __init__(self, *args: Any, mark: Location | None = None):
        super().__init__(*args)
        self.mark = mark or Location("<unknown>")
        self.item_marks: list[Location] = []


def display_path(path: Path) -> str:
    """A path as a user wants to read it: relative to the working directory if inside."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _location_factory(name: str):
    def at(node: yaml.Node) -> Location:
        mark = node.start_mark
        return Location(name, mark.line + 1, mark.column + 1)
    return at


def _make_loader(name: str, problems: list[Problem]) -> type[yaml.SafeLoader]:
    at = _location_factory(name)

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> LocDict:
        loader.flatten_mapping(node)
        data = LocDict(mark=at(node))
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                problems.append(Problem(at(key_node), "", f"key {key!r} is not a string"))
                key = str(key)
            if key in data:
                problems.append(Problem(at(key_node), key, "duplicate key (the mapping "
                                        f"already has {key!r} at line {data.key_marks[key].line})"))
            data[key] = loader.construct_object(value_node, deep=True)
            data.key_marks[key] = at(key_node)
            data.value_marks[key] = at(value_node)
        return data

    def construct_sequence(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> LocList:
        data = LocList(mark=at(node))
        for child in node.value:
            data.append(loader.construct_object(child, deep=True))
            data.item_marks.append(at(child))
        return data

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, construct_sequence)
    return Loader


def load_yaml(path: Path, *, what: str = "recipe") -> Any:
    """Load one YAML document from ``path``; every problem is a located RecipeError."""
    name = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(Location(name), "", f"{what} file not found")]) from None
    except IsADirectoryError:
        raise RecipeError([Problem(Location(name), "", f"{what} path is a directory")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([Problem(Location(name), "", f"cannot read {what}: {exc}")]) from None
    return loads_yaml(text, name)


def loads_yaml(text: str, name: str) -> Any:
    problems: list[Problem] = []
    loader = _make_loader(name, problems)
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(name, mark.line + 1, mark.column + 1) if mark else Location(name)
        what = " ".join(part for part in (exc.context, exc.problem) if part)
        raise RecipeError([Problem(where, "", f"YAML syntax error: {what}")]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(Location(name), "", f"YAML error: {exc}")]) from None
    if problems:
        raise RecipeError(problems)
    return data


def mark_of(data: Any, path: tuple[Any, ...]) -> Location | None:
    """The location of the deepest known node along ``path`` (keys and indices)."""
    best: Location | None = getattr(data, "mark", None)
    node = data
    for step in path:
        if isinstance(node, LocDict) and step in node:
            best = node.value_marks.get(step, best)
            node = node[step]
        elif isinstance(node, LocList) and isinstance(step, int) and 0 <= step < len(node):
            best = node.item_marks[step] if step < len(node.item_marks) else best
            node = node[step]
        else:
            if isinstance(node, LocDict) and step in node.key_marks:
                best = node.key_marks[step]
            break
    return best


def key_mark_of(data: Any, path: tuple[Any, ...]) -> Location | None:
    """Location of the key itself for the last step of ``path`` (for unknown keys)."""
    parent = data
    for step in path[:-1]:
        try:
            parent = parent[step]
        except (KeyError, IndexError, TypeError):
            return mark_of(data, path)
    if isinstance(parent, LocDict) and path and path[-1] in parent.key_marks:
        return parent.key_marks[path[-1]]
    return mark_of(data, path)

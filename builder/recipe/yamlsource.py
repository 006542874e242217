"""YAML loading that remembers where every key and value came from.

Mappings load as :class:`LocDict` and sequences as :class:`LocList`; both carry the
:class:`~builder.errors.Location` of themselves and of each of their entries, so any error
found later (schema, templating, AWS rules) can name file, line and column.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from builder.errors import Location, Problem, RecipeError
from builder.host.aptauth import redact


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


MAX_FILE = 1 << 20          # bytes of one recipe, app or variables file
MAX_VALUES = 100_000        # keys, items and scalars once YAML aliases are expanded
MAX_TEXT = 16 << 20         # characters of all strings once aliases are expanded
MAX_DEPTH = 64              # nesting of mappings and lists
SHOWN = 40                  # characters of a value or key an error message repeats


def shown(value: Any, limit: int = SHOWN) -> str:
    """A value as an error message quotes it: at most ``limit`` characters of it (a file
    that is not a recipe must not be echoed through error messages)."""
    text = redact(value if isinstance(value, str) else str(value))
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


def _shorten_quoted(message: str) -> str:
    """PyYAML's messages quote tokens (aliases, tags) whole: cut each to SHOWN."""
    return re.sub(rf"'([^']{{{SHOWN + 1},}})'", lambda m: shown(m.group(1)), message)


def dotted(path: tuple[Any, ...]) -> str:
    """``root_volume.files[0].dest``; keys are cut to their first 40 characters (a key may
    come from a file that is not a recipe at all)."""
    out = ""
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        else:
            key = str(step)[:SHOWN] + ("…" if len(str(step)) > SHOWN else "")
            out += f".{key}" if out else key
    return out


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
                problems.append(Problem(at(key_node), "", f"key {shown(key)} is not a string"))
                key = str(key)
            if key in data:
                problems.append(Problem(at(key_node), dotted((key,)), "duplicate key (the "
                                        f"mapping already has {shown(key)} at line "
                                        f"{data.key_marks[key].line})"))
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

    def refuse(message: str) -> RecipeError:
        return RecipeError([Problem(Location(name), "", message)])

    try:
        info = os.stat(path)  # special files (FIFOs, /dev/zero) are refused before reading
        if stat.S_ISDIR(info.st_mode):
            raise refuse(f"{what} path is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise refuse(f"{what} path is not a regular file")
        if info.st_size > MAX_FILE:
            raise refuse(f"{what} file is larger than {MAX_FILE} bytes")
        with open(path, "rb") as handle:
            text = handle.read(MAX_FILE + 1).decode("utf-8")
    except FileNotFoundError:
        raise refuse(f"{what} file not found") from None
    except UnicodeDecodeError:
        raise refuse(f"cannot read {what}: not UTF-8 text") from None
    except OSError as exc:
        raise refuse(f"cannot read {what}: {exc.strerror or exc}") from None
    return loads_yaml(text, name)


def loads_yaml(text: str, name: str) -> Any:
    problems: list[Problem] = []
    loader = _make_loader(name, problems)
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(name, mark.line + 1, mark.column + 1) if mark else Location(name)
        what = _shorten_quoted(" ".join(part for part in (exc.context, exc.problem) if part))
        raise RecipeError([Problem(where, "", f"YAML syntax error: {what}")]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(Location(name), "",
                                   f"YAML error: {_shorten_quoted(str(exc))[:200]}")]) from None
    except RecursionError:
        raise RecipeError([Problem(Location(name), "", "YAML nested too deeply")]) from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise RecipeError([Problem(Location(name), "",
                                   f"YAML value error: {str(exc).split(':')[0][:80]}")]) from None
    if problems:
        raise RecipeError(problems)
    _check_expanded_size(data, name)
    return _unshared(data)


def _check_expanded_size(data: Any, name: str) -> None:
    """Refuse a document whose aliases expand it beyond the bounds (a "billion laughs"):
    sizes are counted once per distinct node, so the check itself stays cheap."""
    sizes: dict[int, tuple[int, int, int]] = {}

    def measure(node: Any, depth: int) -> tuple[int, int, int]:
        if depth > MAX_DEPTH:
            raise RecipeError([Problem(getattr(node, "mark", Location(name)), "",
                                       f"nested more than {MAX_DEPTH} levels deep")])
        if id(node) in sizes:
            return sizes[id(node)]
        children = list(node.items()) if isinstance(node, dict) else \
            [(None, v) for v in node] if isinstance(node, list) else []
        count, text, deepest = 1, len(node) if isinstance(node, str) else 0, depth
        for key, value in children:
            c, t, d = measure(value, depth + 1)
            count, text, deepest = count + c, text + t + len(str(key or "")), max(deepest, d)
        if count > MAX_VALUES or text > MAX_TEXT:
            raise RecipeError([Problem(Location(name), "", "the document expands to more than "
                                       f"{MAX_VALUES} values or {MAX_TEXT} characters "
                                       "(YAML aliases?)")])
        sizes[id(node)] = (count, text, deepest)
        return sizes[id(node)]

    measure(data, 0)


def _unshared(node: Any) -> Any:
    """A copy in which no mapping or list appears twice (YAML aliases share them), so that
    rendering templates in place renders each value once."""
    if isinstance(node, LocDict):
        out = LocDict(((k, _unshared(v)) for k, v in node.items()), mark=node.mark)
        out.key_marks, out.value_marks = dict(node.key_marks), dict(node.value_marks)
        return out
    if isinstance(node, LocList):
        out_list = LocList((_unshared(v) for v in node), mark=node.mark)
        out_list.item_marks = list(node.item_marks)
        return out_list
    return node


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

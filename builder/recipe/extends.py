"""``extends:``: a recipe inherits from a base recipe (maps merge, lists append, a key
set to null is removed), under the same path rule as every other file reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builder.errors import Location, Problem, RecipeError
from builder.recipe.paths import outside
from builder.recipe.yamlsource import LocDict, LocList, display_path, load_yaml, shown


def load_mapping(path: Path, what: str) -> LocDict:
    data = load_yaml(path, what=what)
    if data is None:
        data = LocDict(mark=Location(display_path(path), 1, 1))
    if not isinstance(data, LocDict):
        where = getattr(data, "mark", Location(display_path(path), 1, 1))
        raise RecipeError([Problem(where, "", f"a {what} must be a YAML mapping of keys")])
    return data


def load_with_extends(path: Path, sources: list[Path], chain: tuple[Path, ...],
                       base_dir: Path, allow_host: bool) -> LocDict:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(display_path(p) for p in (*chain, resolved))
        raise RecipeError([Problem(Location(display_path(path)), "extends",
                                   f"extends cycle: {cycle}")])
    data = load_mapping(path, "recipe" if not chain else "base recipe")
    sources.append(resolved)
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return data
    if not isinstance(base_ref, str):
        raise RecipeError([Problem(data.value_marks["extends"], "extends",
                                   "must be a path to a recipe file")])
    base_path = resolved.parent / base_ref
    refused = outside(base_ref, base_path, base_dir, allow_host)
    if refused:
        raise RecipeError([Problem(data.value_marks["extends"], "extends", refused)])
    if not base_path.is_file():
        raise RecipeError([Problem(data.value_marks["extends"], "extends",
                                   f"base recipe {shown(base_ref)} not found")])
    base = load_with_extends(base_path, sources, (*chain, resolved), base_dir, allow_host)
    return merge(base, data)


def merge(base: Any, override: Any) -> Any:
    """Maps merge, lists append, a key set to null removes it."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = LocDict(mark=getattr(override, "mark", None))
        for source in (base, override):
            out.key_marks.update(getattr(source, "key_marks", {}))
            out.value_marks.update(getattr(source, "value_marks", {}))
        for key, value in base.items():
            out[key] = value
        for key, value in override.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out
    if isinstance(base, list) and isinstance(override, list):
        out_list = LocList([*base, *override], mark=getattr(override, "mark", None))
        out_list.item_marks = [*getattr(base, "item_marks", []),
                               *getattr(override, "item_marks", [])]
        return out_list
    return override

"""From a recipe file to a validated :class:`Recipe`: extends, variables, templating,
apps, path safety, schema validation, and the cross-field rules. Every problem found is
reported at once, each with file, line, column and key path."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from builder import distros
from builder.errors import InputError, Location, Problem, RecipeError
from builder.recipe import rules
from builder.recipe.errors_map import dotted, problems_from
from builder.recipe.extends import load_mapping, load_with_extends
from builder.recipe.model import App, AppRef, FileSpec, Recipe
from builder.recipe.paths import check_paths
from builder.recipe.templating import (
    OutOfTime,
    TemplateError,
    environment_access,
    render,
    rendering_budget,
)
from builder.recipe.yamlsource import (
    LocDict,
    display_path,
    load_yaml,
    mark_of,
    shown,
)


@dataclass(frozen=True)
class LoadOptions:
    variables: dict[str, str] = field(default_factory=dict)
    var_files: tuple[Path, ...] = ()
    allow_host_paths: bool = False
    source_date_epoch: int | None = None
    allow_env: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    base_dir: Path
    sources: tuple[Path, ...]  # every recipe, app and template file read, once each
    build_time: int
    reproducible: bool = False
    env_read: tuple[str, ...] = ()
    # the recipe's name as written, before templating: the same for every release of it
    name_template: str = ""


def load_recipe(path: Path, options: LoadOptions | None = None) -> LoadedRecipe:
    options = options or LoadOptions()
    path = Path(path)
    base_dir = path.resolve().parent
    sources: list[Path] = []
    data = load_with_extends(path, sources, (), base_dir, options.allow_host_paths)
    build_time = build_epoch(options)
    variables = _variables(data, options, build_time)
    name_template = str(data.get("name", ""))
    try:
        with environment_access(options.allow_env | _env_names(data)) as env, \
                rendering_budget():
            problems = _render_tree(data, variables, skip=("vars", "env"))
            check_paths(data, base_dir, options.allow_host_paths, problems)
            recipe = _validate(Recipe, data, reported=problems)
            _check_rules(recipe, data, options.allow_host_paths, base_dir)
            recipe = _render_recipe_templates(recipe, data, base_dir, variables, sources)
            recipe = _apply_apps(recipe, data, base_dir, variables, options, sources)
    except (OutOfTime, MemoryError) as exc:  # outside a single template's rendering
        message = str(exc) if isinstance(exc, OutOfTime) else "the recipe needs too much memory"
        raise RecipeError([Problem(Location(display_path(path)), "", message)]) from None
    return LoadedRecipe(recipe=recipe, path=path, base_dir=base_dir,
                        sources=tuple(dict.fromkeys(sources)), build_time=build_time,
                        reproducible=epoch_is_fixed(options), env_read=tuple(sorted(env.read)),
                        name_template=name_template)


def _env_names(data: LocDict) -> frozenset[str]:
    """The recipe's ``env:``: the environment variables its templates may read."""
    names = data.get("env") or []
    if not isinstance(names, list) or not all(
            isinstance(n, str) and n.isidentifier() for n in names):
        raise RecipeError([Problem(mark_of(data, ("env",)) or data.mark, "env",
                                   "must be a list of environment variable names")])
    return frozenset(names)


def epoch_is_fixed(options: LoadOptions) -> bool:
    """SOURCE_DATE_EPOCH given: the build must be reproducible from it."""
    env = os.environ.get("SOURCE_DATE_EPOCH", "")
    return options.source_date_epoch is not None or env.isdigit()


def build_epoch(options: LoadOptions) -> int:
    if options.source_date_epoch is not None:
        return options.source_date_epoch
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env and env.isdigit():
        return int(env)
    return int(datetime.datetime.now(datetime.UTC).timestamp())


# --- variables and templating ------------------------------------------------------------

def _variables(data: LocDict, options: LoadOptions, build_time: int) -> dict[str, Any]:
    recipe_vars = data.get("vars") or {}
    if not isinstance(recipe_vars, dict):
        raise RecipeError([Problem(mark_of(data, ("vars",)) or data.mark, "vars",
                                   "must be a mapping of names to values")])
    variables: dict[str, Any] = {}
    variables.update(_facts(data, build_time))
    variables.update(recipe_vars)
    for var_file in options.var_files:
        loaded = load_yaml(var_file, what="variables")
        if not isinstance(loaded, dict):
            raise InputError(f"{display_path(var_file)}: a --var-file must hold a mapping")
        variables.update(loaded)
    variables.update(options.variables)
    return variables


def build_id(build_time: int) -> str:
    """The build's id as recipes see it ({{ build_id }}): its time, to the second, UTC."""
    return datetime.datetime.fromtimestamp(build_time, datetime.UTC).strftime("%Y%m%d%H%M%S")


def _facts(data: LocDict, build_time: int) -> dict[str, Any]:
    when = datetime.datetime.fromtimestamp(build_time, datetime.UTC)
    os_data = data.get("os") if isinstance(data.get("os"), dict) else {}
    distribution = distros.Distribution.registry.get(str(os_data.get("distribution")),
                                                     distros.Debian)
    arch = data.get("arch", "x86_64")
    return {
        "build_date": when.strftime("%Y-%m-%d"),
        "build_id": build_id(build_time),
        "arch": arch if isinstance(arch, str) else "x86_64",
        "os": {"distribution": distribution.name,
               "release": os_data.get("release") or distribution.default_release},
    }


def _render_tree(node: Any, variables: dict[str, Any], skip: tuple[str, ...] = (),
                 path: tuple[Any, ...] = (), root: Any = None) -> list[Problem]:
    """Render every string in place; return the problems, each located."""
    root = node if root is None else root
    problems: list[Problem] = []
    items: list[tuple[Any, Any]]
    if isinstance(node, dict):
        items = [(k, v) for k, v in node.items() if not (path == () and k in skip)]
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return problems
    for key, value in items:
        here = (*path, key)
        if isinstance(value, str):
            try:
                node[key] = render(value, variables)
            except TemplateError as exc:
                where = mark_of(root, here) or Location("<recipe>")
                problems.append(Problem(where, dotted(here), str(exc)))
        else:
            problems.extend(_render_tree(value, variables, (), here, root))
    return problems


def _check_rules(recipe: Recipe, data: Any, allow_host: bool, base_dir: Path) -> None:
    found = [*rules.check(recipe), *([] if allow_host else rules.host_path_rules(recipe)),
             *rules.uefi_certificate_rules(recipe, base_dir)]
    problems = [Problem(mark_of(data, path) or Location("<recipe>"), dotted(path), message)
                for path, message in found]
    if problems:
        raise RecipeError(problems)


# --- file templates ----------------------------------------------------------------------

def render_file_templates(files: list[FileSpec], data: Any, at: tuple[Any, ...],
                          base_dir: Path, variables: dict[str, Any],
                          sources: list[Path]) -> list[FileSpec]:
    """Render ``template:`` sources with the variables in scope where they are declared
    (an app sees its own vars); the plan then carries the rendered content."""
    out, problems = [], []
    for index, spec in enumerate(files):
        if spec.template is None:
            out.append(spec)
            continue
        where = (*at, index, "template")
        sources.append((base_dir / spec.template).resolve())
        try:
            text = render((base_dir / spec.template).read_text(encoding="utf-8"), variables)
        except (TemplateError, OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(mark_of(data, where) or Location("<recipe>"),
                                    dotted(where), f"{spec.template}: {exc}"))
            continue
        out.append(spec.model_copy(update={"template": None, "content": text}))
    if problems:
        raise RecipeError(problems)
    return out


def _render_recipe_templates(recipe: Recipe, data: Any, base_dir: Path,
                             variables: dict[str, Any], sources: list[Path]) -> Recipe:
    volume = recipe.root_volume
    files = render_file_templates(volume.files, data, ("root_volume", "files"), base_dir,
                                  variables, sources)
    mappings = []
    for index, mapping in enumerate(recipe.block_device_mappings):
        content = mapping.ebs.content if mapping.ebs else None
        if content is not None and mapping.ebs is not None:
            at = ("block_device_mappings", index, "ebs", "content", "files")
            rendered = render_file_templates(content.files, data, at, base_dir, variables,
                                             sources)
            mapping = mapping.model_copy(update={"ebs": mapping.ebs.model_copy(update={
                "content": content.model_copy(update={"files": rendered})})})
        mappings.append(mapping)
    return recipe.model_copy(update={"root_volume": volume.model_copy(update={"files": files}),
                                     "block_device_mappings": mappings})


# --- validation and apps -----------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], data: Any, reported: list[Problem] | None = None) -> M:
    """Validate against the schema; raise every problem at once, together with those
    already ``reported`` (templating, paths), one per key path."""
    reported = list(reported or [])
    try:
        result = model.model_validate(data)
    except ValidationError as exc:
        seen = {p.path for p in reported}
        reported += [p for p in problems_from(exc, model, data) if p.path not in seen]
    if reported:
        raise RecipeError(reported)
    return result


def _apply_apps(recipe: Recipe, data: LocDict, base_dir: Path, variables: dict[str, Any],
                options: LoadOptions, sources: list[Path]) -> Recipe:
    apps = _load_apps(recipe.apps, data, ("apps",), base_dir, variables, options, sources, ())
    if not apps:
        return recipe
    volume = recipe.root_volume
    update: dict[str, Any] = {k: list(getattr(volume, k)) for k in
                              ("packages", "files", "users", "scripts")}
    enable, disable = list(volume.services.enable), list(volume.services.disable)
    for app in apps:
        for key in ("packages", "files", "users", "scripts"):
            update[key] += getattr(app, key)
        enable += app.services.enable
        disable += app.services.disable
    update["services"] = volume.services.model_copy(update={"enable": enable,
                                                            "disable": disable})
    return recipe.model_copy(update={"root_volume": volume.model_copy(update=update)})


def _load_apps(refs: list[Any], data: Any, at: tuple[Any, ...], base_dir: Path,
               variables: dict[str, Any], options: LoadOptions, sources: list[Path],
               chain: tuple[Path, ...]) -> list[App]:
    out: list[App] = []
    for index, ref in enumerate(refs):
        path = (base_dir / ref.include)
        where = mark_of(data, (*at, index, "include")) or Location("<recipe>")
        resolved = path.resolve()
        if resolved in chain:
            cycle = " -> ".join(display_path(p) for p in (*chain, resolved))
            raise RecipeError([Problem(where, dotted((*at, index, "include")),
                                       f"include cycle: {cycle}")])
        if not path.is_file():
            raise RecipeError([Problem(where, dotted((*at, index, "include")),
                                       f"app file {shown(ref.include)} not found")])
        out += _load_app(path, ref.vars, base_dir, variables, options, sources,
                         (*chain, resolved))
    return out


def _load_app(path: Path, include_vars: dict[str, Any], base_dir: Path,
              variables: dict[str, Any], options: LoadOptions, sources: list[Path],
              chain: tuple[Path, ...]) -> list[App]:
    data = load_mapping(path, "app")
    sources.append(path.resolve())
    defaults = data.get("vars") if isinstance(data.get("vars"), dict) else {}
    app_vars = {**defaults, **variables, **include_vars}
    problems = _render_tree(data, app_vars, skip=("vars",))
    check_paths(data, base_dir, options.allow_host_paths, problems)
    nested = LocDict(mark=data.mark)
    if "apps" in data:
        nested.value_marks["apps"] = data.value_marks["apps"]
        nested["apps"] = data.pop("apps")
    app = _validate(App, data, reported=problems)
    app = app.model_copy(update={"files": render_file_templates(
        app.files, data, ("files",), base_dir, app_vars, sources)})
    refs = _validate(_NestedApps, nested).apps
    return [*_load_apps(refs, nested, ("apps",), base_dir, variables, options, sources,
                        chain), app]


class _NestedApps(BaseModel):
    """An app's own ``apps:`` (apps it builds on), applied before it."""

    apps: list[AppRef] = []


"""Composition, variables and templating of recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.cli import main
from builder.errors import RecipeError
from builder.recipe.extends import merge
from builder.recipe.load import LoadOptions, load_recipe
from builder.recipe.yamlsource import loads_yaml


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_merge_maps_merge_lists_append_null_removes() -> None:
    base = loads_yaml("a: {x: 1, y: 2}\nl: [1, 2]\ngone: 1\nkeep: k\n", "base.yaml")
    child = loads_yaml("a: {y: 3}\nl: [3]\ngone: null\n", "child.yaml")
    assert merge(base, child) == {"a": {"x": 1, "y": 3}, "l": [1, 2, 3], "keep": "k"}


def test_extends_inherits_and_appends(tmp_path: Path) -> None:
    write(tmp_path, {
        "base.yaml": "name: base-image\nroot_volume:\n  packages: [vim]\n  size: 3GiB\n",
        "sub/child.yaml": "extends: ../base.yaml\nname: child-image\nroot_volume:\n"
                          "  packages: [curl]\n",
    })
    loaded = load_recipe(tmp_path / "sub/child.yaml",
                         LoadOptions(allow_host_paths=True))
    assert loaded.recipe.name == "child-image"
    assert loaded.recipe.root_volume.packages == ["vim", "curl"]
    assert loaded.recipe.root_volume.size == 3 << 30


def test_variables_command_line_wins(tmp_path: Path) -> None:
    write(tmp_path, {"r.yaml": "name: \"img-{{ v }}-{{ w }}\"\nvars: {v: recipe, w: recipe}\n",
                     "vars.yaml": "v: file\nw: file\n"})
    loaded = load_recipe(tmp_path / "r.yaml", LoadOptions(
        variables={"v": "cli"}, var_files=(tmp_path / "vars.yaml",)))
    assert loaded.recipe.name == "img-cli-file"


def test_build_facts(tmp_path: Path) -> None:
    write(tmp_path, {"r.yaml": "name: \"x-{{ build_date }}-{{ build_id }}-{{ arch }}-"
                               "{{ os.release }}\"\n"})
    loaded = load_recipe(tmp_path / "r.yaml", LoadOptions(source_date_epoch=1767225600))
    assert loaded.recipe.name == "x-2026-01-01-20260101000000-x86_64-trixie"


def test_env_function_is_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe lists what it reads (env:), the command line may allow more; the names
    read, never the values, are recorded."""
    write(tmp_path, {"r.yaml": "name: \"v-{{ env('AMIFORGE_VERSION') }}-"
                               "{{ env('AMIFORGE_NOPE', 'dflt') }}\"\n"
                               "env: [AMIFORGE_VERSION]\n"})
    monkeypatch.setenv("AMIFORGE_VERSION", "1.2")
    monkeypatch.delenv("AMIFORGE_NOPE", raising=False)
    loaded = load_recipe(tmp_path / "r.yaml",
                         LoadOptions(allow_env=frozenset({"AMIFORGE_NOPE"})))
    assert loaded.recipe.name == "v-1.2-dflt"
    assert loaded.env_read == ("AMIFORGE_NOPE", "AMIFORGE_VERSION")
    with pytest.raises(RecipeError, match=r"env\('AMIFORGE_NOPE'\) is not allowed"):
        load_recipe(tmp_path / "r.yaml")


def test_plain_environment_is_not_visible(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, {"r.yaml": "name: \"v-{{ HOME }}\"\n"})
    with pytest.raises(RecipeError, match="'HOME' is undefined"):
        load_recipe(tmp_path / "r.yaml")


@pytest.mark.parametrize("expression", [
    "{{ ''.__class__ }}", "{{ cycler.__init__.__globals__ }}", "{% include '/etc/passwd' %}",
    "{{ range.__self__ }}",
])
def test_templates_cannot_escape(tmp_path: Path, expression: str) -> None:
    write(tmp_path, {"r.yaml": f"name: \"{expression}\"\n"})
    with pytest.raises(RecipeError):
        load_recipe(tmp_path / "r.yaml")


def test_apps_fold_in_order_with_their_own_variables(tmp_path: Path) -> None:
    write(tmp_path, {
        "r.yaml": "name: web-image\nvars: {greeting: hi}\nroot_volume:\n  packages: [a]\n"
                  "apps:\n  - include: apps/one.yaml\n  - include: apps/two.yaml\n"
                  "    vars: {who: two}\n",
        "apps/one.yaml": "packages: [b]\nservices: {enable: [one.service]}\n",
        "apps/two.yaml": "vars: {who: nobody}\npackages: [c]\nfiles:\n"
                         "  - {template: t/page.j2, dest: /srv/page}\n",
        "apps/t/page.j2": "{{ greeting }} from {{ who }}\n",
    })
    recipe = load_recipe(tmp_path / "r.yaml").recipe
    assert recipe.root_volume.packages == ["a", "b", "c"]
    assert recipe.root_volume.services.enable == ["one.service"]
    [page] = recipe.root_volume.files
    assert (page.dest, page.content, page.template) == ("/srv/page", "hi from two\n", None)


def test_host_paths_allowed_with_flag(tmp_path: Path) -> None:
    write(tmp_path, {"outside": "x", "r/r.yaml": "name: xyz\nroot_volume:\n  files:\n"
                                                 "    - {src: ../outside, dest: /o}\n"})
    with pytest.raises(RecipeError, match="outside the recipe's folder"):
        load_recipe(tmp_path / "r/r.yaml")
    loaded = load_recipe(tmp_path / "r/r.yaml", LoadOptions(allow_host_paths=True))
    assert loaded.recipe.root_volume.files[0].src == str(tmp_path / "outside")


def test_schema_command_prints_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"].endswith("2020-12/schema")
    assert {"name", "root_volume", "block_device_mappings", "ami", "apps", "outputs"} <= set(
        schema["properties"])
    assert schema["additionalProperties"] is False


def test_shipped_schema_file_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2]
    assert main(["schema"]) == 0
    assert json.loads((root / "schema/recipe.schema.json").read_text()) == json.loads(
        capsys.readouterr().out), "run: .venv/bin/build schema > schema/recipe.schema.json"


def test_shipped_recipes_carry_the_schema_line() -> None:
    root = Path(__file__).resolve().parents[2]
    for recipe in sorted((root / "recipes").glob("*.yaml")):
        assert "# yaml-language-server: $schema=../schema/recipe.schema.json" in \
            recipe.read_text().splitlines()[0], recipe


def test_validate_all_shipped_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[2]
    recipes = sorted(str(p) for p in (root / "recipes").glob("*.yaml"))
    assert len(recipes) >= 2
    assert main(["validate", *recipes]) == 0, capsys.readouterr().err


def test_every_file_the_recipe_pulls_in_is_recorded() -> None:
    """build-manifest.json's inputs: extended recipes, apps, templates and files, each
    once with its sha256."""
    from builder.plan import make_plan, sha256_file
    from tests.conftest import RECIPES

    sources = make_plan(load_recipe(RECIPES / "debian-12-web.yaml")).sources
    inputs = [{"path": s.name, "sha256": s.sha256} for s in sources]
    paths = [i["path"] for i in inputs]
    for expected in ("debian-12-web.yaml", "debian-12-minimal.yaml", "apps/nginx.yaml",
                     "apps/files/index.html.j2", "files/motd"):
        assert expected in paths, expected
    assert len(paths) == len(set(paths))
    motd = next(i for i in inputs if i["path"] == "files/motd")
    assert motd["sha256"] == sha256_file(RECIPES / "files/motd")

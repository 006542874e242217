"""Property: whatever YAML it is fed, `build validate` answers 0 or 2 and never raises."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.cli import main
from tests.conftest import RECIPES

KEYS = ["name", "description", "arch", "vars", "os", "root_volume", "apps", "ami", "outputs",
        "block_device_mappings", "size", "boot", "packages", "files", "users", "services",
        "scripts", "dest", "src", "content", "mode", "device", "ebs", "volume_size",
        "virtual_name", "no_device", "root", "tags", "extends", "include", "{{ x }}"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True), st.text(max_size=20),
                    st.sampled_from(["2GiB", "bios", "uefi", "/dev/xvda", "ephemeral3",
                                     "{{ undefined }}", "{% if %}", "../x", "/etc/passwd"]))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8),
                                               children, max_size=5)),
    max_leaves=25)


def validate_text(tmp: Path, text: str) -> int:
    path = tmp / "recipe.yaml"
    path.write_text(text)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return main(["validate", str(path)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents)
def test_random_documents(tmp_path_factory, document: object) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    assert validate_text(tmp_path_factory.mktemp("p"), text) in (0, 2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_shipped_recipes(tmp_path_factory, data: st.DataObject) -> None:
    recipe = data.draw(st.sampled_from(sorted(RECIPES.glob("*.yaml"))))
    doc = yaml.safe_load(recipe.read_text())
    doc.pop("extends", None)
    for _ in range(data.draw(st.integers(1, 4))):
        doc = mutate(doc, data)
    tmp = tmp_path_factory.mktemp("m")
    (tmp / "files").mkdir()
    (tmp / "files/motd").write_text("hi\n")
    assert validate_text(tmp, yaml.safe_dump(doc)) in (0, 2)


def mutate(node: object, data: st.DataObject) -> object:
    """Replace, delete or retype one randomly chosen node."""
    if isinstance(node, dict) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node, key=str)))
        action = data.draw(st.sampled_from(["recurse", "delete", "replace", "rename"]))
        copy = dict(node)
        if action == "recurse":
            copy[key] = mutate(copy[key], data)
        elif action == "delete":
            del copy[key]
        elif action == "replace":
            copy[key] = data.draw(documents)
        else:
            copy[data.draw(st.sampled_from(KEYS))] = copy.pop(key)
        return copy
    if isinstance(node, list) and node and data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(node) - 1))
        copy_list = list(node)
        copy_list[index] = mutate(copy_list[index], data)
        return copy_list
    return data.draw(documents)

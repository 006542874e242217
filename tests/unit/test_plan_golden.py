"""The resolved plan of every shipped recipe matches its golden file (tests/golden/plans).
After an intended change: UPDATE_GOLDEN=1 pytest tests/unit/test_plan_golden.py, then review
the diff like any other change."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder.plan import make_plan
from builder.recipe.load import LoadOptions, load_recipe
from tests.conftest import FIXED_EPOCH, RECIPES

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "plans"
SHIPPED = sorted(p.name for p in RECIPES.glob("*.yaml"))


@pytest.mark.parametrize("recipe", SHIPPED)
def test_plan_matches_golden(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(RECIPES.parent)
    loaded = load_recipe(Path("recipes") / recipe, LoadOptions(source_date_epoch=FIXED_EPOCH))
    text = json.dumps(make_plan(loaded).to_dict(), indent=2, sort_keys=True) + "\n"
    golden = GOLDEN / (Path(recipe).stem + ".json")
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden plan for {recipe}: run with UPDATE_GOLDEN=1"
    assert text == golden.read_text()


def test_every_golden_file_has_a_recipe() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == sorted(Path(r).stem for r in SHIPPED)


def test_plan_is_stable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(RECIPES.parent)
    options = LoadOptions(source_date_epoch=FIXED_EPOCH)
    first = make_plan(load_recipe(Path("recipes/debian-12-minimal.yaml"), options)).to_dict()
    second = make_plan(load_recipe(Path("recipes/debian-12-minimal.yaml"), options)).to_dict()
    assert first == second


def test_every_release_of_a_recipe_has_the_same_uuids() -> None:
    """Partition and filesystem UUIDs come from the recipe's name as written: a release a
    day later (another build_date in the AMI name) differs only where its contents do."""
    def plan(recipe: str, epoch: int) -> dict:
        return make_plan(load_recipe(RECIPES / recipe,
                                     LoadOptions(source_date_epoch=epoch))).to_dict()

    today, tomorrow = plan("debian-13-minimal.yaml", FIXED_EPOCH), \
        plan("debian-13-minimal.yaml", FIXED_EPOCH + 86400)
    assert today["name"] != tomorrow["name"]
    assert today["partitions"] == tomorrow["partitions"]
    other = plan("debian-13-web.yaml", FIXED_EPOCH)
    assert {p["uuid"] for p in other["partitions"]}.isdisjoint(
        p["uuid"] for p in today["partitions"])

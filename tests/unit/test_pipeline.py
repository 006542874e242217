"""The runner of declared stages, and which plan changes invalidate which stage."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from builder.build import STAGES
from builder.pipeline.cache import StageCache
from builder.pipeline.progress import Progress
from builder.pipeline.runner import Context, Runner, Stage
from builder.plan import make_plan
from builder.recipe.load import LoadOptions, load_recipe
from tests.conftest import FIXED_EPOCH, RECIPES, copy_recipes

KEPT = ("bootstrap", "configure", "filesystem")


def keys(plan: Any, recipe_dir: Path) -> dict[str, str]:
    from builder.pipeline.cache import digest

    inputs = Runner.stage_inputs(STAGES, plan, {"recipe_dir": recipe_dir})
    return {name: digest(value) for name, value in inputs.items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory):
    recipes = copy_recipes(tmp_path_factory.mktemp("recipes") / "recipes")
    loaded = load_recipe(recipes / "debian-12-ebs.yaml",
                         LoadOptions(source_date_epoch=FIXED_EPOCH))
    return make_plan(loaded), recipes


def _users(plan: Any) -> Any:
    return dataclasses.replace(plan, users=plan.users[:-1])


# change -> the stages whose stored output it must invalidate (every other must survive)
CHANGES = {
    "a package": (lambda p: dataclasses.replace(p, os=dataclasses.replace(
        p.os, packages=(*p.os.packages, "vim"))), KEPT),
    "the mirror": (lambda p: dataclasses.replace(p, os=dataclasses.replace(
        p.os, mirror="http://mirror.example/debian")), KEPT),
    "the hostname": (lambda p: dataclasses.replace(p, hostname="other"),
                     ("configure", "filesystem")),
    "a user": (_users, ("configure", "filesystem")),
    "the kernel command line": (lambda p: dataclasses.replace(
        p, kernel_cmdline=(*p.kernel_cmdline, "quiet")), ("configure", "filesystem")),
    "a data volume": (lambda p: dataclasses.replace(p, data_volumes=(dataclasses.replace(
        p.data_volumes[0], label="other"),)), ("configure", "filesystem")),
    "the output formats": (lambda p: dataclasses.replace(p, formats=("raw",)), ()),
    "qcow2 compression": (lambda p: dataclasses.replace(p, qcow2_compress=True), ()),
    "the AMI's tags": (lambda p: dataclasses.replace(p, ami={**p.ami, "tags": {"a": "b"}}),
                       ()),
    "the description": (lambda p: dataclasses.replace(p, description="other"), ()),
    "the build time, reproducible": (lambda p: dataclasses.replace(
        p, source_date_epoch=p.source_date_epoch + 1), KEPT),
}


@pytest.mark.parametrize("change", sorted(CHANGES), ids=sorted(CHANGES))
def test_what_a_plan_change_invalidates(base, change: str) -> None:
    plan, recipes = base
    mutate, invalidated = CHANGES[change]
    before, after = keys(plan, recipes), keys(mutate(plan), recipes)
    changed = tuple(s for s in KEPT if before[s] != after[s])
    assert changed == invalidated


def test_the_build_time_of_an_unreproducible_build_invalidates_nothing(base) -> None:
    plan, recipes = base
    plan = dataclasses.replace(plan, reproducible=False)
    later = dataclasses.replace(plan, source_date_epoch=plan.source_date_epoch + 60)
    assert keys(plan, recipes) == keys(later, recipes)


def test_a_recipe_file_invalidates_configure_and_later(base) -> None:
    plan, recipes = base
    before = keys(plan, recipes)
    source = next(f.src for v in plan.data_volumes for f in v.files if f.src)
    original = (recipes / source).read_text()
    (recipes / source).write_text(original + "changed\n")
    try:
        after = keys(plan, recipes)
    finally:
        (recipes / source).write_text(original)
    assert [s for s in KEPT if before[s] != after[s]] == ["configure", "filesystem"]


# --- the runner, with small stages of files ----------------------------------------------

def _stages(log: list[str], value: dict[str, str]) -> list[Stage]:
    def first(ctx: Context) -> dict[str, Any]:
        log.append("first")
        (ctx.output / "a").write_text(value["first"])
        return {"from_first": value["first"]}

    def second(ctx: Context) -> dict[str, Any]:
        log.append("second")
        (ctx.output / "b").write_text((ctx.input("first") / "a").read_text() + value["second"])
        return {"from_second": value["second"]}

    def third(ctx: Context) -> None:
        log.append("third")
        (ctx.output / "c").write_text((ctx.input("second") / "b").read_text() + "!")

    return [Stage("first", first, inputs=lambda plan, extras: {"v": value["first"]}),
            Stage("second", second, after=("first",),
                  inputs=lambda plan, extras: {"v": value["second"]}),
            Stage("third", third, after=("second",))]


def _run(tmp_path: Path, stages: list[Stage], name: str) -> tuple[Any, Progress, Path]:
    workspace = tmp_path / name
    workspace.mkdir()
    progress = Progress(quiet=True)
    with contextlib.ExitStack() as held:
        result = Runner(StageCache(tmp_path / "cache"), workspace, progress, held).run(
            stages, None, {})  # type: ignore[arg-type]
        text = (workspace / "third/c").read_text()
    assert text
    return result, progress, workspace


def test_the_runner_reuses_the_newest_stored_stage(tmp_path: Path) -> None:
    log: list[str] = []
    value = {"first": "1", "second": "2"}
    result, progress, _ = _run(tmp_path, _stages(log, value), "a")
    assert log == ["first", "second", "third"]
    assert result.facts == {"from_first": "1", "from_second": "2"}

    log.clear()
    result, progress, ws = _run(tmp_path, _stages(log, value), "b")
    assert log == ["third"]  # first and second come from the cache
    assert {n: s["source"] for n, s in progress.report().items()} == {
        "first": "not needed", "second": "cache", "third": "built"}
    assert result.facts == {"from_first": "1", "from_second": "2"}
    assert (ws / "third/c").read_text() == "12!"

    log.clear()
    value["second"] = "3"
    result, progress, ws = _run(tmp_path, _stages(log, value), "c")
    assert log == ["second", "third"]
    assert progress.report()["first"]["source"] == "cache"
    assert (ws / "third/c").read_text() == "13!"


def test_a_change_upstream_changes_every_key_downstream(tmp_path: Path) -> None:
    value = {"first": "1", "second": "2"}
    before = Runner.stage_inputs(_stages([], value), None, {})  # type: ignore[arg-type]
    value["first"] = "changed"
    after = Runner.stage_inputs(_stages([], value), None, {})  # type: ignore[arg-type]
    assert before["second"]["v"] == after["second"]["v"]
    assert before["second"]["after"] != after["second"]["after"]


def test_shipped_recipes_declare_their_stages() -> None:
    plan = make_plan(load_recipe(RECIPES / "debian-12-minimal.yaml"))
    names = [s.name for s in STAGES if s.when(plan)]
    assert names == ["bootstrap", "configure", "filesystem", "disk", "convert"]


def test_a_layered_entry_whose_base_was_made_again_is_stale(tmp_path: Path) -> None:
    """A layered entry names the very base entry it lies over (its id), not only the
    base's key: over a bootstrap made again under the same key it must not be reused."""
    import json

    cache = StageCache(tmp_path / "cache")
    with cache.new_entry("bootstrap", "k1", {}) as entry:
        (entry / "tree").mkdir()
    first_id = cache.entry_id("bootstrap", "k1")
    with cache.new_entry("configure", "k2", {}) as entry:
        (entry / "upper").mkdir()
        (entry / "base.json").write_text(json.dumps(["bootstrap", "k1", first_id]))
    with contextlib.ExitStack() as held:
        runner = Runner(cache, tmp_path, Progress(quiet=True), held)
        assert not runner._stale("configure", "k2")
        cache.discard("bootstrap", "k1")  # pruned, then made again: another id
        with cache.new_entry("bootstrap", "k1", {}) as entry:
            (entry / "tree").mkdir()
        assert runner._stale("configure", "k2")
        assert not runner._usable("configure", "k2")


def test_copy_fallback_after_a_failed_mount_copies_the_tree_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from builder.host import overlay
    from builder.pipeline.trees import Trees

    def refused(stack, target, lowers, upper=None, work=None):  # mkdir, then mount fails
        for folder in (target, upper, work):
            folder.mkdir(parents=True, exist_ok=True)
        return False

    monkeypatch.setattr(overlay, "try_mount", refused)
    base = tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc/hostname").write_text("x\n")
    with contextlib.ExitStack() as held:
        target = tmp_path / "ws/configure-tree"
        assert Trees(tmp_path / "ws", held).writable(target, [base]) is None
    assert (target / "etc/hostname").read_text() == "x\n"

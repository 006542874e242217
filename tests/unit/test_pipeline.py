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


def keys(plan: Any) -> dict[str, str]:
    from builder.pipeline.cache import digest

    inputs = Runner.stage_inputs(STAGES, plan, {})
    return {name: digest(value) for name, value in inputs.items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory):
    recipes = copy_recipes(tmp_path_factory.mktemp("recipes") / "recipes")
    loaded = load_recipe(recipes / "debian-12-ebs.yaml",
                         LoadOptions(source_date_epoch=FIXED_EPOCH))
    return make_plan(loaded), recipes


def _users(plan: Any) -> Any:
    return dataclasses.replace(plan, users=plan.users[:-1])


def _ami(plan: Any, **changes: Any) -> Any:
    return dataclasses.replace(plan, ami=dataclasses.replace(plan.ami, **changes))


def _data_volume(plan: Any, **changes: Any) -> Any:
    devices = tuple(dataclasses.replace(d, volume=dataclasses.replace(d.volume, **changes))
                    if d.volume else d for d in plan.ami.block_devices)
    return _ami(plan, block_devices=devices)


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
    "a data volume's label": (lambda p: _data_volume(p, label="other"),
                              ("configure", "filesystem")),
    "a data volume's size": (lambda p: _data_volume(p, size=2 << 30), ("filesystem",)),
    "a data volume's snapshot settings": (lambda p: _ami(p, block_devices=tuple(
        dataclasses.replace(d, ebs=dataclasses.replace(d.ebs, volume_type="io2"))
        if d.ebs else d for d in p.ami.block_devices)), ()),
    "the output formats": (lambda p: dataclasses.replace(p, formats=("raw",)), ()),
    "qcow2 compression": (lambda p: dataclasses.replace(p, qcow2_compress=True), ()),
    "the AMI's tags": (lambda p: _ami(p, tags={"a": "b"}), ()),
    "the AMI's boot mode": (lambda p: _ami(p, boot_mode="uefi"), ()),
    "the recipe's own text": (lambda p: dataclasses.replace(p, sources=(dataclasses.replace(
        p.sources[0], sha256="0" * 64), *p.sources[1:])), ()),
    "the environment names read": (lambda p: dataclasses.replace(
        p, environment_read=("HOME",)), ()),
    "the description": (lambda p: dataclasses.replace(p, description="other"), ()),
    "the build time, reproducible": (lambda p: dataclasses.replace(
        p, source_date_epoch=p.source_date_epoch + 1), KEPT),
}


@pytest.mark.parametrize("change", sorted(CHANGES), ids=sorted(CHANGES))
def test_what_a_plan_change_invalidates(base, change: str) -> None:
    plan, _ = base
    mutate, invalidated = CHANGES[change]
    before, after = keys(plan), keys(mutate(plan))
    changed = tuple(s for s in KEPT if before[s] != after[s])
    assert changed == invalidated


def test_the_build_time_of_an_unreproducible_build_invalidates_nothing(base) -> None:
    plan, _ = base
    plan = dataclasses.replace(plan, reproducible=False)
    later = dataclasses.replace(plan, source_date_epoch=plan.source_date_epoch + 60)
    assert keys(plan) == keys(later)


@pytest.mark.parametrize(("source", "invalidated"), [
    ("files/motd", ["configure", "filesystem"]),          # copied into the root tree
    ("files/data/README", ["filesystem"]),                # copied onto the data volume
    ("debian-12-minimal.yaml", []),                       # what it says is in the plan
])
def test_a_recipe_file_invalidates_the_stages_that_copy_it(
        base, source: str, invalidated: list[str]) -> None:
    plan, recipes = base
    original = (recipes / source).read_text()
    (recipes / source).write_text(original + "\n# changed\n")
    try:
        changed = make_plan(load_recipe(recipes / "debian-12-ebs.yaml",
                                        LoadOptions(source_date_epoch=FIXED_EPOCH)))
    finally:
        (recipes / source).write_text(original)
    before, after = keys(plan), keys(changed)
    assert [s for s in KEPT if before[s] != after[s]] == invalidated


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


def test_prune_removes_the_layered_entries_of_a_pruned_base(tmp_path: Path) -> None:
    """A configure layer over a pruned bootstrap can never be used again: prune takes it
    too (and what lay over it), so `cache prune` frees what it says."""
    import json

    cache = StageCache(tmp_path / "cache")
    with cache.new_entry("bootstrap", "b1", {}) as entry:
        (entry / "tree").mkdir()
    with cache.new_entry("configure", "c1", {}) as entry:
        (entry / "base.json").write_text(json.dumps(
            ["bootstrap", "b1", cache.entry_id("bootstrap", "b1")]))
    with cache.new_entry("filesystem", "f1", {}) as entry:
        (entry / "root.img").write_bytes(b"x")
    with cache.new_entry("other", "o1", {}) as entry:
        (entry / "base.json").write_text(json.dumps(
            ["configure", "c1", cache.entry_id("configure", "c1")]))
    cache.discard("bootstrap", "b1")
    removed = {(e.stage, e.key) for e in cache.prune(max_size=1 << 40)}
    assert removed == {("configure", "c1"), ("other", "o1")}
    assert [(e.stage, e.key) for e in cache.entries()] == [("filesystem", "f1")]


def test_verbose_says_when_the_archive_moved(tmp_path: Path) -> None:
    """A security update lands under the same suite names: the bootstrap's key holds each
    suite's signed Release date, and -v says why the stored bootstrap was not used."""
    cache = StageCache(tmp_path / "cache")
    before = {"os": {"release": "trixie"},
              "archive": [{"suite": "trixie-security", "date": "Sat, 28 Nov 2026"}]}
    with cache.new_entry("bootstrap", "k1", before) as entry:
        (entry / "tree").mkdir()
    after = {**before, "archive": [{"suite": "trixie-security", "date": "Mon, 30 Nov 2026"}]}
    assert cache.why_missed("bootstrap", after).startswith("the archive changed")
    both = {**after, "os": {"release": "bookworm"}}
    assert cache.why_missed("bootstrap", both).endswith("; changed: os")

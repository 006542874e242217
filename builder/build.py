"""The build pipeline, top to bottom: recipe -> plan -> tree -> filesystems -> disk ->
conversions -> AMI manifests -> build manifest. Each step is a function of the plan and the
previous step's output; this module only puts them in order."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import overlay
from builder.audit.checks import Finding, aws_keys_in_tags, run_checks
from builder.audit.report import apply_waivers, fail_on_errors
from builder.audit.views import TreeView
from builder.bundle import BundleKeys, bundle_image
from builder.cache import Entry, StageCache, copy_tree, place
from builder.errors import BuildFailed, InputError
from builder.fsutil import atomic_write_json, copy_sparse, create_sparse
from builder.plan import Plan
from builder.progress import Progress
from builder.recipe.load import LoadedRecipe
from builder.stages import bootloader, filesystem
from builder.stages.bootstrap import bootstrap
from builder.stages.cached import (
    UPPER,
    RootTree,
    StageInputs,
    explain_miss,
    fill_bootstrap_tree,
    is_layered,
    read_facts,
    stage_inputs,
    write_facts,
)
from builder.stages.configure import configure
from builder.stages.convert import EXTENSIONS, convert
from builder.stages.disk import assemble_disk
from builder.stages.manifest import (
    ami_manifests,
    artifact_entry,
    build_manifest,
    installed_packages,
    recipe_inputs,
)
from builder.stages.volumes import make_volume
from builder.templates import render_template
from builder.tools import check_tools
from builder.workspace import land, output_directory, signals_deferred, workspace


@dataclass(frozen=True)
class BuildOptions:
    output_dir: Path
    cache_dir: Path | None = None
    formats: tuple[str, ...] | None = None
    bundle_keys: BundleKeys | None = None


@dataclass
class BuildResult:
    output_dir: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "amiforge"


def build_image(loaded: LoadedRecipe, plan: Plan, options: BuildOptions,
                progress: Progress) -> BuildResult:
    """Reuse the newest cached stage whose inputs are unchanged, make the rest in order."""
    check_tools(plan, {v.filesystem for v in plan.data_volumes})
    formats = options.formats or plan.formats
    if "raw" not in formats:  # the raw image is what becomes a snapshot or a bundle
        formats = ("raw", *formats)
    cache = StageCache(options.cache_dir) if options.cache_dir else None
    inputs = stage_inputs(plan, loaded.base_dir)
    with output_directory(options.output_dir) as out, contextlib.ExitStack() as landing, \
            workspace(out) as ws, contextlib.ExitStack() as in_use:
        disk = ws / "disk.raw"
        root = RootTree(ws / "tree", in_use.enter_context(contextlib.ExitStack()))
        filesystems = use_cached(cache, "filesystem", inputs, in_use)
        configured = filesystems or use_configured(cache, inputs, in_use)
        with progress.stage("bootstrap", f"{len(plan.os.packages)} packages") as stage:
            stage.source = "not needed" if configured else bootstrap_stage(
                plan, root, cache, inputs, in_use)
        with progress.stage("configure") as stage:
            if configured:
                stage.source, facts = "cache", read_facts(configured.path)
                if not filesystems:
                    show_configured(root, configured, cache, inputs)
            else:
                configure(plan, root.path, loaded.base_dir)
                facts = {"packages": installed_packages(root.path),
                         "audit": [f.to_dict() for f in run_checks(TreeView(root.path))]}
            findings, waivers, unused = apply_waivers(
                [*(Finding(**f) for f in facts["audit"]), *aws_keys_in_tags(plan.ami["tags"])],
                plan.audit_allow)
            for waiver in unused:
                progress.say(f"warning: audit waiver {waiver['check']!r} matched nothing; "
                             "remove it from audit.allow")
            fail_on_errors(findings)
        with progress.stage("filesystem") as stage:
            if filesystems:
                stage.source, fs_dir = "cache", filesystems.path
            else:
                fs_dir = ws / "filesystems"
                make_filesystems(plan, root.path, fs_dir, loaded.base_dir)
                store(cache, "filesystem", inputs, {"": fs_dir}, facts, how="link")
            root.release()
            if not configured:  # nothing reads the tree any more: move it into the cache
                store(cache, "configure", inputs, root.cache_items(), facts, how="move")
        with progress.stage("disk"):
            assemble_disk(plan, disk, {"root": fs_dir / "root.img", "esp": fs_dir / "esp.img"},
                          make_bios_core(plan, ws))
        hashes = in_use.enter_context(ArtifactHashes())
        hashes.add(disk, "raw", disk.name)  # the largest hash, alongside the conversions
        volumes = [fs_dir / v.image for v in plan.data_volumes]
        with progress.stage("convert", ", ".join(f for f in formats if f != "raw") or "none"):
            outputs = convert_all(plan, [disk, *volumes], ws, formats)
        bundle_files = {}
        if plan.backing == "instance-store":
            with progress.stage("bundle"):
                bundle_files = make_bundle(plan, disk, ws, options.bundle_keys)
        artifacts = hashes.entries(outputs)
        written = ami_manifests(plan, ws, artifacts)
        audit = {"findings": [f.to_dict() for f in findings], "waivers": waivers,
                 "unused_waivers": unused}
        manifest = build_manifest(plan, loaded.path, artifacts, facts["packages"],
                                  progress.timings, {"stages": progress.report(),
                                                     "audit": audit,
                                                     "environment_read": list(loaded.env_read),
                                                     "inputs": recipe_inputs(
                                                         loaded.sources, plan,
                                                         loaded.base_dir)})
        atomic_write_json(ws / "build-manifest.json", manifest)
        # from here on, an interrupt waits until the results landed and the workspace is gone
        landing.enter_context(signals_deferred())
        land({**{path: name for path, (_, name) in outputs.items()}, **bundle_files,
                 **{path: path.name for path in written},
                 ws / "build-manifest.json": "build-manifest.json"}, out)
    return BuildResult(output_dir=options.output_dir, manifest=manifest,
                       timings=progress.timings)


def use_cached(cache: StageCache | None, stage: str, inputs: StageInputs,
               in_use: contextlib.ExitStack) -> Entry | None:
    """The cached entry for this stage's inputs, held (shared lock) until the build ends
    so that pruning cannot remove it while it is read."""
    if cache is None:
        return None
    in_use_here = contextlib.ExitStack()
    in_use_here.enter_context(cache.in_use(stage, inputs.key(stage)))
    entry = cache.lookup(stage, inputs.key(stage))
    if entry is None:
        in_use_here.close()
        explain_miss(cache, stage, inputs)
        return None
    in_use.push(in_use_here)
    return entry


def use_configured(cache: StageCache | None, inputs: StageInputs,
                   in_use: contextlib.ExitStack) -> Entry | None:
    """The cached configured tree; one kept as layers also needs its bootstrap entry."""
    entry = use_cached(cache, "configure", inputs, in_use)
    if entry is None or not is_layered(entry):
        return entry
    if cache is None or not overlay.usable(cache.root):
        return None
    return entry if use_cached(cache, "bootstrap", inputs, in_use) else None


def show_configured(root: RootTree, configured: Entry, cache: StageCache | None,
                    inputs: StageInputs) -> None:
    """Point ``root`` at a cached configured tree (read-only)."""
    if not is_layered(configured):
        root.path = configured.path / "tree"
        return
    assert cache is not None  # a layered entry comes from a cache
    base = cache.path("bootstrap", inputs.key("bootstrap")) / "tree"
    if not root.layer([configured.path / UPPER, base], writable=False):
        raise BuildFailed("cannot mount the cached configured tree's layers; "
                          "run with --no-cache")


def bootstrap_stage(plan: Plan, root: RootTree, cache: StageCache | None,
                    inputs: StageInputs, in_use: contextlib.ExitStack) -> str:
    """Bootstrap into ``root``. With a cache, the bootstrap entry is made once (builds
    needing it at once wait for the first), then layered under ``root`` or copied.
    Returns where the tree came from."""
    if cache is None:
        bootstrap(plan.os, root.path, None)
        return "built"
    key, source = inputs.key("bootstrap"), "cache"
    in_use.enter_context(cache.in_use("bootstrap", key))
    with cache.making("bootstrap", key):
        entry = cache.lookup("bootstrap", key)
        if entry is None:
            explain_miss(cache, "bootstrap", inputs)
            source = fill_bootstrap_tree(plan.os, cache, inputs, root.path,
                                         cache.root / "apt-archives")
            layers = overlay.usable(root.path.parent, cache.root)
            store(cache, "bootstrap", inputs, {"tree": root.path},
                  how="move" if layers else "copy", locked=True)
            if not layers:
                return source
    base = cache.path("bootstrap", key) / "tree"
    if not root.layer([base]):
        copy_tree(base, root.path)
    return source


def store(cache: StageCache | None, stage: str, inputs: StageInputs, items: dict[str, Path],
          facts: dict[str, Any] | None = None, how: str = "copy",
          locked: bool = False) -> None:
    """Keep a stage's output in the cache (see ``cache.place`` for ``how``); an item named
    "" is a folder whose files become the entry's files."""
    if cache is None:
        return
    key = inputs.key(stage)
    with contextlib.ExitStack() as stack:
        if not locked:
            stack.enter_context(cache.making(stage, key))
        entry = stack.enter_context(cache.new_entry(stage, key, getattr(inputs, stage)))
        for name, path in items.items():
            if name:
                place(path, entry / name, how)
            else:
                for child in path.iterdir():
                    place(child, entry / child.name, how)
        if facts is not None:
            write_facts(entry, facts)


class ArtifactHashes:
    """Manifest entries for the outputs, each hashed in a thread as soon as it is final:
    the sha256 of a multi-GiB sparse image is a large part of a warm rebuild, and it can
    run while qemu-img converts."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
        self._pending: dict[Path, concurrent.futures.Future[dict[str, Any]]] = {}

    def __enter__(self) -> ArtifactHashes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(cancel_futures=True)

    def add(self, path: Path, fmt: str, final_name: str) -> None:
        self._pending[path] = self._pool.submit(artifact_entry, path, fmt, final_name)

    def entries(self, outputs: dict[Path, tuple[str, str]]) -> list[dict[str, Any]]:
        for path, (fmt, name) in outputs.items():
            if path not in self._pending:
                self.add(path, fmt, name)
        return [self._pending[path].result() for path in outputs]


def early_config(plan: Plan, ws: Path) -> Path:
    path = ws / "grub-early.cfg"
    if not path.exists():
        path.write_text(render_template("grub-early.cfg.j2", plan=plan))
    return path


def make_filesystems(plan: Plan, tree: Path, folder: Path, recipe_dir: Path) -> None:
    """root.img, esp.img (if the plan has an ESP) and each data volume's image. The ESP
    and the volumes do not depend on the root filesystem: they are made alongside it."""
    folder.mkdir()
    root = plan.root
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        others = pool.submit(make_esp_and_volumes, plan, tree, folder, recipe_dir)
        filesystem.make_ext4(folder / "root.img", root.size, tree, str(root.fs_uuid),
                             plan.root_label, plan.source_date_epoch, plan.reproducible)
        others.result()


def make_esp_and_volumes(plan: Plan, tree: Path, folder: Path, recipe_dir: Path) -> None:
    work = folder.parent
    esp = plan.partition("esp")
    if esp is not None:
        efi = work / "grub.efi"
        bootloader.build_efi_image(plan.arch, efi, early_config(plan, work))
        _, removable = bootloader.EFI_REMOVABLE[plan.arch]
        filesystem.make_esp(folder / "esp.img", esp.size, str(esp.fs_uuid),
                            {f"/{removable}": efi}, plan.source_date_epoch)
    for volume in plan.data_volumes:
        make_volume(volume, folder / volume.image, work, recipe_dir, tree,
                    plan.source_date_epoch, plan.reproducible)


def make_bios_core(plan: Plan, ws: Path) -> Path | None:
    if plan.partition("bios-boot") is None:
        return None
    core = ws / "core.img"
    bootloader.build_bios_core(core, early_config(plan, ws))
    return core


def make_bundle(plan: Plan, disk: Path, ws: Path, keys: BundleKeys | None) -> dict[Path, str]:
    if keys is None:
        raise InputError("instance-store backing needs --user-cert, --user-key, --ec2-cert and "
                         "--account-id (or ami.bundle in the recipe)")
    bundle_dir = ws / "bundle"
    bundle_image(disk, bundle_dir, keys, plan)
    return {bundle_dir: "bundle"}


def convert_all(plan: Plan, images: list[Path], ws: Path,
                formats: tuple[str, ...]) -> dict[Path, tuple[str, str]]:
    """Workspace path -> (format, final file name) for every image and requested format."""
    outputs: dict[Path, tuple[str, str]] = {}
    for image in images:
        stem = image.name.removesuffix(".raw")
        for fmt in formats:
            name = f"{stem}.{EXTENSIONS[fmt]}"
            if fmt == "raw" and image.parent == ws:
                outputs[image] = (fmt, name)
                continue
            if fmt == "raw":  # a cached image: give the output its own copy
                target = ws / name
                create_sparse(target, image.stat().st_size)
                copy_sparse(image, target)
                outputs[target] = (fmt, name)
                continue
            target = ws / name
            convert(image, target, fmt, compress=plan.qcow2_compress)
            outputs[target] = (fmt, name)
    return outputs

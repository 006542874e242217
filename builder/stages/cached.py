"""The keys of the cacheable stages (bootstrap, configure, filesystem) and the ways a
stage's output is reused: a bootstrapped tree is the lower layer of an overlay (or copied,
where overlays cannot be used), a configured tree and filesystem images are read in place
(nothing changes them)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import __version__, overlay
from builder.cache import Entry, StageCache, copy_tree, digest
from builder.chroot import prepared_root, run_in_root
from builder.errors import ToolFailed
from builder.plan import Plan, sha256_file
from builder.run import run
from builder.stages.bootstrap import SEED_FILES, bootstrap
from builder.stages.filesystem import clamp_times
from builder.templates import templates_dir

log = logging.getLogger("amiforge.cache")
STAGE_FORMAT = 2  # bump when a stage's output changes for the same inputs
FACTS = "facts.json"


@functools.cache
def tool_version(*argv: str) -> str:
    try:
        return (run(list(argv), capture=True).strip().splitlines() or ["unknown"])[0]
    except (ToolFailed, OSError):
        return "unknown"


@dataclasses.dataclass(frozen=True)
class StageInputs:
    bootstrap: dict[str, Any]
    configure: dict[str, Any]
    filesystem: dict[str, Any]

    def key(self, stage: str) -> str:
        return digest(getattr(self, stage))


VERSIONED_TOOLS = (("mmdebstrap", "--version"), ("mke2fs", "-V"), ("grub-mkimage", "--version"))


def tool_versions() -> dict[str, str]:
    """The versions of the tools whose output is cached, asked for at once (each takes up
    to 0.1 s)."""
    with concurrent.futures.ThreadPoolExecutor() as pool:
        versions = pool.map(lambda argv: tool_version(*argv), VERSIONED_TOOLS)
        return {argv[0]: version for argv, version in zip(VERSIONED_TOOLS, versions, strict=True)}


def stage_inputs(plan: Plan, recipe_dir: Path) -> StageInputs:
    """Everything each stage's output depends on; a stage's key is the hash of this."""
    versions = tool_versions()
    data = plan.to_dict()
    bootstrap = {"os": data["os"], "format": STAGE_FORMAT,
                 "mmdebstrap": versions["mmdebstrap"],
                 "seed": _templates_digest(t for _, _, t, _ in SEED_FILES),
                 # a reproducible build clamps the bootstrapped tree's times (so that its
                 # configure layer holds only what configure changed)
                 "epoch": plan.source_date_epoch if plan.reproducible else None}
    configure = {k: v for k, v in data.items() if k not in (
        "formats", "qcow2_compress", "ami", "register_image", "launch_permission", "backing",
        "os", "recipe_path", "description", "disk_size")}
    if not plan.reproducible:  # the build time only matters when it is fixed
        configure.pop("source_date_epoch")
    sources = sorted({f.src for f in plan.files if f.src} |
                     {f.src for v in plan.data_volumes for f in v.files if f.src})
    configure.update(bootstrap=digest(bootstrap), templates=_templates_digest(),
                     sources={s: sha256_file(recipe_dir / s) for s in sources},
                     amiforge=__version__, format=STAGE_FORMAT)
    filesystem = {"configure": digest(configure), "partitions": data["partitions"],
                  "data_volumes": data["data_volumes"], "arch": plan.arch,
                  "epoch": plan.source_date_epoch if plan.reproducible else None,
                  "amiforge": __version__,
                  "format": STAGE_FORMAT, "mke2fs": versions["mke2fs"],
                  "grub": versions["grub-mkimage"]}
    return StageInputs(*(_plain(inputs) for inputs in (bootstrap, configure, filesystem)))


def _plain(inputs: dict[str, Any]) -> dict[str, Any]:
    """As JSON has it (tuples become lists), so inputs compare equal to stored ones."""
    return json.loads(json.dumps(inputs, default=str))


def _templates_digest(names: Iterable[str] | None = None) -> str:
    """The hash of the named templates, or of all of them."""
    paths = [templates_dir() / n for n in names] if names else templates_dir().glob("*")
    hasher = hashlib.sha256()
    for path in sorted(paths):
        hasher.update(path.name.encode() + b"\0" + path.read_bytes())
    return hasher.hexdigest()


def explain_miss(cache: StageCache, stage: str, inputs: StageInputs) -> None:
    log.info("    %s not cached: %s", stage, cache.why_missed(stage, getattr(inputs, stage)))


@dataclass
class RootTree:
    """The tree that the configure and filesystem stages work on: a plain folder, or an
    overlay of cached trees (read-only lower layers) and an upper folder that takes this
    build's changes (see builder.overlay)."""

    path: Path
    mounts: contextlib.ExitStack
    upper: Path | None = None

    def layer(self, lowers: list[Path], writable: bool = True) -> bool:
        """Show ``lowers`` (topmost first) at ``path``; False if overlays cannot be used."""
        upper = self.path.with_name("upper") if writable else None
        work = self.path.with_name("overlay-work") if writable else None
        if not overlay.try_mount(self.mounts, self.path, lowers, upper, work):
            return False
        self.upper = upper
        return True

    def release(self) -> None:
        """Unmount (the upper folder keeps the changes)."""
        self.mounts.close()

    def cache_items(self) -> dict[str, Path]:
        """What a configure entry keeps: the changes alone, or the whole tree."""
        return {UPPER: self.upper} if self.upper else {"tree": self.path}


UPPER = "upper"  # a configure entry kept as the overlay's upper layer has this folder


def is_layered(entry: Entry) -> bool:
    """Whether a configure entry holds only the changes over its bootstrap entry."""
    return (entry.path / UPPER).is_dir()


def fill_bootstrap_tree(plan_os: Any, cache: StageCache, inputs: StageInputs, tree: Path,
                        apt_cache: Path) -> str:
    """Bootstrap into ``tree``: from a cached bootstrap that lacks only some packages,
    completed with apt ("extended"), or with mmdebstrap ("built")."""
    base = _subset_entry(cache, inputs.bootstrap)
    with contextlib.ExitStack() as held:
        if base is not None:  # held while copied, so that pruning cannot remove it midway
            held.enter_context(cache.in_use("bootstrap", base.key))
            if cache.lookup("bootstrap", base.key) is None:
                base = None
            else:
                copy_tree(base.path / "tree", tree)
    if base is None:
        bootstrap(plan_os, tree, apt_cache)
        source = "built"
    else:
        _install_more(tree, inputs.bootstrap["os"]["packages"], plan_os.apt_auth)
        source = "extended"
    if inputs.bootstrap["epoch"] is not None:
        clamp_times(tree, inputs.bootstrap["epoch"], atimes=False)
    return source


def _subset_entry(cache: StageCache, inputs: dict[str, Any]) -> Entry | None:
    """The cached bootstrap with the most packages, made the same way, lacking only some."""
    wanted = set(inputs["os"]["packages"])

    def same_except_packages(other: dict[str, Any]) -> bool:
        strip = lambda d: {**d, "os": {**d["os"], "packages": None}}  # noqa: E731
        return strip(other) == strip(inputs)

    candidates = [e for e in cache.entries() if e.stage == "bootstrap"]
    usable = [(len(m["os"]["packages"]), e) for e in candidates
              if same_except_packages(m := e.meta["inputs"])
              and set(m["os"]["packages"]) < wanted]
    return max(usable, key=lambda pair: pair[0])[1] if usable else None


def _install_more(tree: Path, packages: list[str], apt_auth: str | None) -> None:
    install = ["apt-get", "install", "-y", "--no-install-recommends", "--", *packages]
    with prepared_root(tree, apt_auth):
        try:
            run_in_root(tree, install)
        except ToolFailed:  # the cached package lists may be stale: refresh once
            run_in_root(tree, ["apt-get", "update"])
            run_in_root(tree, install)
        run_in_root(tree, ["apt-get", "clean"])


def write_facts(folder: Path, facts: dict[str, Any]) -> None:
    """What later stages need to know about a configured tree (installed packages, audit
    findings), kept with every entry made from it."""
    (folder / FACTS).write_text(json.dumps(facts, sort_keys=True))


def read_facts(folder: Path) -> dict[str, Any]:
    return json.loads((folder / FACTS).read_text())

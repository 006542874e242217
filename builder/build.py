"""The build pipeline, top to bottom: recipe -> plan -> the stages below -> AMI manifests
-> build manifest. The stages say what they read and what their output depends on; the
runner (builder.pipeline.runner) reuses the newest stored stage and runs the rest."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.archive import archive_state
from builder.audit.report import audit_report, check_audit
from builder.host.fsutil import atomic_write_json
from builder.host.workspace import land, output_directory, signals_deferred, workspace
from builder.outputs.bundle import BundleKeys
from builder.outputs.manifest import (
    ami_manifests,
    artifact_entry,
    build_manifest,
    remove_stale_manifests,
)
from builder.outputs.sbom import write_sboms
from builder.pipeline.cache import StageCache
from builder.pipeline.progress import Progress
from builder.pipeline.runner import Runner, Stage
from builder.plan import Plan
from builder.stages import bootstrap, bundle, configure, convert, disk, fsimages
from builder.tools import check_tools

STAGES = (
    Stage("bootstrap", bootstrap.run_stage, inputs=bootstrap.inputs, tree=True,
          detail=lambda plan, _: f"{len(plan.os.packages)} packages"),
    Stage("configure", configure.run_stage, after=("bootstrap",), inputs=configure.inputs,
          tree=True, check=check_audit),
    Stage("filesystem", fsimages.run_stage, after=("configure",), inputs=fsimages.inputs),
    Stage("disk", disk.run_stage, after=("filesystem",)),
    Stage("convert", convert.run_stage, after=("disk", "filesystem"),
          detail=lambda _, extras: ", ".join(f for f in extras["formats"] if f != "raw")
          or "none"),
    Stage("bundle", bundle.run_stage, after=("disk",), when=bundle.wanted),
)


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


def build_image(plan: Plan, options: BuildOptions, progress: Progress) -> BuildResult:
    check_tools(plan, {v.filesystem for v in plan.data_volumes})
    formats = options.formats or plan.formats
    if "raw" not in formats:  # the raw image is what becomes a snapshot or a bundle
        formats = ("raw", *formats)
    cache = StageCache(options.cache_dir) if options.cache_dir else None
    with output_directory(options.output_dir) as out, contextlib.ExitStack() as landing, \
            workspace(out) as ws, contextlib.ExitStack() as held:
        hashes = held.enter_context(ArtifactHashes())
        extras = {"formats": formats, "hashes": hashes, "bundle_keys": options.bundle_keys,
                  "archive": archive_state(plan.os)}
        facts = Runner(cache, ws, progress, held).run(STAGES, plan, extras).facts
        outputs = {Path(p): (fmt, name) for p, (fmt, name) in facts["outputs"].items()}
        artifacts = hashes.entries(outputs)
        written = ami_manifests(plan, ws, artifacts)
        raw = next(a for a in artifacts if a["format"] == "raw")
        written += write_sboms(plan, ws, facts["sbom"], raw["sha256"])
        findings, waivers, unused = audit_report(plan, facts)
        manifest = build_manifest(plan, artifacts, facts["packages"], progress.timings, {
            "stages": progress.report(),
            "audit": {"findings": [f.to_dict() for f in findings], "waivers": waivers,
                      "unused_waivers": unused},
            "environment_read": list(plan.environment_read),
            "archive": facts.get("archive")})
        atomic_write_json(ws / "build-manifest.json", manifest)
        # from here on, an interrupt waits until the results landed and the workspace is gone
        landing.enter_context(signals_deferred())
        bundle_dir = {ws / "bundle": "bundle"} if bundle.wanted(plan) else {}
        land({**{path: name for path, (_, name) in outputs.items()}, **bundle_dir,
              **{path: path.name for path in written},
              ws / "build-manifest.json": "build-manifest.json"}, out)
        remove_stale_manifests(out, written)
    return BuildResult(output_dir=options.output_dir, manifest=manifest,
                       timings=progress.timings)


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

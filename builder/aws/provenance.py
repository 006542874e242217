"""Where a published AMI came from, said where pipelines look: tags on the AMI and on each
snapshot (the recipe's sha256, the build id, amiforge's version, the recipe repository's
commit), and packer-manifest.json in the shape of Packer's manifest post-processor, so the
scripts and Terraform glue that read Packer's manifest read amiforge's unchanged."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

from builder.host.fsutil import atomic_write_json

PACKER_MANIFEST = "packer-manifest.json"
TAG_VALUE = re.compile(r"^[A-Za-z0-9 _.:/=+\-@]{1,256}$")  # what EC2 takes in any region


def provenance_tags(manifest: dict[str, Any]) -> dict[str, str]:
    """amiforge:* tags from build-manifest.json (only values EC2 accepts: a manifest from
    an edited output directory cannot smuggle anything else into a tag)."""
    recipe = manifest.get("recipe") or {}
    tags = {"amiforge:recipe-sha256": recipe.get("sha256"),
            "amiforge:build-id": manifest.get("build_id"),
            "amiforge:version": manifest.get("amiforge_version"),
            "amiforge:git-commit": recipe.get("git_commit")}
    return {k: str(v) for k, v in tags.items() if isinstance(v, str) and TAG_VALUE.match(v)}


def with_image_tags(request: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """RegisterImage input with ``tags`` added to the image's tags (the recipe's win)."""
    specs = [s for s in request.get("TagSpecifications", []) if s["ResourceType"] != "image"]
    own = {t["Key"]: t["Value"] for s in request.get("TagSpecifications", [])
           if s["ResourceType"] == "image" for t in s["Tags"]}
    merged = {**tags, **own}
    if merged:
        specs.append({"ResourceType": "image",
                      "Tags": [{"Key": k, "Value": v} for k, v in merged.items()]})
    return {**request, "TagSpecifications": specs} if specs else request


def write_packer_manifest(output_dir: Path, manifest: dict[str, Any],
                          targets: dict[str, dict[str, Any]]) -> Path:
    """packer-manifest.json: one build per publish target (account/region), its
    artifact_id "region:ami-…,region:ami-…" listing the AMI and every copy."""
    builds = []
    for target, record in sorted(targets.items()):
        if not record.get("image_id"):
            continue
        regions = {record.get("region", ""): record["image_id"]}
        regions.update({r: c["image_id"] for r, c in sorted(record.get("copies", {}).items())
                        if c.get("image_id")})
        run = str(uuid.uuid5(uuid.NAMESPACE_URL, f"amiforge:{target}:{record['image_id']}"))
        builds.append({
            "name": manifest.get("name"), "builder_type": "amiforge",
            "build_time": int(manifest.get("source_date_epoch") or 0),
            "files": [{"name": a["path"], "size": a.get("file_size")}
                      for a in manifest.get("artifacts", [])],
            "artifact_id": ",".join(f"{r}:{i}" for r, i in regions.items()),
            "packer_run_uuid": run,
            "custom_data": {"target": target, **provenance_tags(manifest)}})
    path = output_dir / PACKER_MANIFEST
    atomic_write_json(path, {"builds": builds,
                             "last_run_uuid": builds[-1]["packer_run_uuid"] if builds else ""})
    return path

"""A moto server on 127.0.0.1 and what the AWS tests share: clients, a check that a
snapshot holds an image, a proxy that injects faults, small output directories made from a
plan without a build."""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import os
import random
import threading
from pathlib import Path

import boto3

from builder.amiplan import LaunchPermissions
from builder.aws.snapshots import BLOCK, nonzero_blocks
from builder.host.fsutil import atomic_write_json, create_sparse
from builder.image.filesystem import make_ext4
from builder.outputs.manifest import ami_manifests, build_manifest
from builder.plan import make_plan, sha256_file
from builder.recipe.load import LoadOptions, load_recipe
from tests.conftest import FIXED_EPOCH, RECIPES

REGION, OTHER = "us-east-1", "eu-west-1"
MiB = 1 << 20


def client(service: str, url: str, region: str = REGION):
    return boto3.client(service, region_name=region, endpoint_url=url)


def small_output(target: Path, name: str, root_data: int = 2 * MiB,
                 encrypted_volume: bool = True, **ami_changes: object) -> Path:
    """An output directory of debian-12-ebs.yaml as a build writes it (register-image.json,
    snapshots.json, launch-permission.json, from the plan), with small images in place of
    the real ones: ``root_data`` bytes of random data in a sparse disk.raw 8 MiB larger
    (block 0 a hole), and volume-sdf.raw a real 8 MiB ext4 of a few files made as a build makes it
    (assume_storage_prezeroed: its unwritten blocks must read as zeros). The recipe
    encrypts /dev/sdf (with the account's default key, so the AMI is not shared unless
    ``launch_permissions`` says so); ``encrypted_volume=False`` makes it plain and shared
    as the recipe says. ``ami_changes`` replace
    fields of the plan's AMI (e.g. deprecate_after_days)."""
    plan = make_plan(load_recipe(RECIPES / "debian-12-ebs.yaml",
                                 LoadOptions(source_date_epoch=FIXED_EPOCH)))
    devices = tuple(dataclasses.replace(d, ebs=dataclasses.replace(
        d.ebs, encrypted=encrypted_volume)) if d.volume else d for d in plan.ami.block_devices)
    if encrypted_volume:  # AWS shares no AMI whose snapshots use the AWS managed key
        ami_changes.setdefault("launch_permissions", LaunchPermissions())
    plan = dataclasses.replace(plan, ami=dataclasses.replace(
        plan.ami, name=name, block_devices=devices, **ami_changes))
    target.mkdir(parents=True)
    disk, volume = target / "disk.raw", target / "volume-sdf.raw"
    create_sparse(disk, root_data + 8 * MiB)
    rng = random.Random(name)
    with open(disk, "r+b") as handle:
        for offset in range(BLOCK, BLOCK + root_data, BLOCK):
            handle.seek(offset)
            handle.write(rng.randbytes(BLOCK))
    tree = target.parent / f"{target.name}-tree"
    (tree / "docs").mkdir(parents=True)
    (tree / "README").write_text("built by amiforge\n")
    (tree / "docs/data.bin").write_bytes(rng.randbytes(300 << 10))
    make_ext4(volume, 8 * MiB, tree, plan.data_volumes[0].fs_uuid, "data", FIXED_EPOCH)
    artifacts = [{"path": p.name, "format": "raw", "virtual_size": p.stat().st_size,
                  "sha256": sha256_file(p)} for p in (disk, volume)]
    ami_manifests(plan, target, artifacts)
    atomic_write_json(target / "build-manifest.json", build_manifest(plan, artifacts, [], {}))
    return target


def published(output: Path) -> dict:
    """publish.json's record of the one target (account/region) published to."""
    targets = json.loads((output / "publish.json").read_text())["targets"]
    assert len(targets) == 1, sorted(targets)
    return next(iter(targets.values()))


def verify_with_a_corrupted_block(aws, rules, snapshot_id: str, image: Path, index: int):
    """`build verify-snapshot SNAPSHOT IMAGE --json` while the test server serves block
    INDEX of the snapshot corrupted (tests/awsrules.py): the finished process."""
    with rules.snapshots.lock:
        rules.snapshots.corrupt.add((snapshot_id, index))
    try:
        return aws("verify-snapshot", snapshot_id, str(image), "--json", url=rules.url)
    finally:
        rules.snapshots.corrupt.clear()


def register_request(output: Path) -> dict:
    return json.loads((output / "register-image.json").read_text())


def assert_snapshot_holds(rules, snapshot_id: str, image: Path, region: str = REGION,
                          skipped_zeros: bool = False) -> None:
    """A volume made from the snapshot reads the image, block for block, even when the
    volume is encrypted (unwritten blocks then read as random bytes, tests/awsrules.py).
    With ``skipped_zeros`` (publish --skip-zero-blocks) the volume is read as a plain one,
    and exactly the image's non-zero blocks must have been sent."""
    size = image.stat().st_size
    with open(image, "rb") as handle:
        for index in range(-(-size // BLOCK)):
            expected = os.pread(handle.fileno(), BLOCK, index * BLOCK).ljust(BLOCK, b"\0")
            got = rules.volume_block(region, snapshot_id, index,
                                     encrypted_volume=not skipped_zeros)
            assert got == expected, index
    if skipped_zeros:
        indexes, _ = nonzero_blocks(image)
        assert sorted(rules.snapshots.written[snapshot_id]) == indexes


class FaultyProxy(http.server.ThreadingHTTPServer):
    """Forwards to moto; fails a share of PutSnapshotBlock calls with 500 or throttling and
    drops one connection, to show that publish retries its way through."""

    def __init__(self, upstream: str, failure_rate: float = 0.06):
        self.upstream = upstream.removeprefix("http://")
        self.failure_rate = failure_rate
        self.random = random.Random(7)
        self.failed = {"500": 0, "throttle": 0, "dropped": 0}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), FaultyHandler)


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    server: FaultyProxy

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and "/blocks/" in self.path and self._fail():
            return
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        upstream.request(self.command, self.path, body, dict(self.headers))
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fail(self) -> bool:
        proxy = self.server
        with proxy.lock:
            roll = proxy.random.random()
            if proxy.failed["dropped"] == 0 and roll < proxy.failure_rate:
                proxy.failed["dropped"] += 1
                self.close_connection = True
                self.connection.shutdown(2)
                return True
            if roll >= proxy.failure_rate:
                return False
            kind = "500" if roll < proxy.failure_rate / 2 else "throttle"
            proxy.failed[kind] += 1
        if kind == "500":
            self._error(500, "InternalServerException")
        else:
            self._error(429, "ThrottlingException")
        return True

    def _error(self, status: int, code: str) -> None:
        data = json.dumps({"message": code}).encode()
        self.send_response(status)
        self.send_header("x-amzn-ErrorType", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = _forward

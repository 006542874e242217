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

from builder.aws.snapshots import BLOCK, nonzero_blocks
from builder.host.fsutil import create_sparse
from builder.outputs.manifest import ami_manifests
from builder.plan import make_plan, sha256_file
from builder.recipe.load import LoadOptions, load_recipe
from tests.conftest import FIXED_EPOCH, RECIPES

REGION, OTHER = "us-east-1", "eu-west-1"
MiB = 1 << 20


def client(service: str, url: str, region: str = REGION):
    return boto3.client(service, region_name=region, endpoint_url=url)


def small_output(target: Path, name: str, root_data: int = 2 * MiB) -> Path:
    """An output directory of debian-12-ebs.yaml as a build writes it (register-image.json,
    snapshots.json, launch-permission.json, from the plan), with small raw images in place
    of the real ones: ``root_data`` bytes of random data in a 64 MiB sparse disk.raw
    (block 0 a hole) and a few blocks in volume-sdf.raw."""
    plan = make_plan(load_recipe(RECIPES / "debian-12-ebs.yaml",
                                 LoadOptions(source_date_epoch=FIXED_EPOCH)))
    plan = dataclasses.replace(plan, ami=dataclasses.replace(plan.ami, name=name))
    target.mkdir(parents=True)
    rng = random.Random(name)
    artifacts = []
    for image, size, data in (("disk.raw", 64 * MiB, root_data), ("volume-sdf.raw", 4 * MiB,
                                                                   3 * BLOCK)):
        path = target / image
        create_sparse(path, size)
        with open(path, "r+b") as handle:
            for offset in range(BLOCK, BLOCK + data, BLOCK):  # block 0 stays a hole
                handle.seek(offset)
                handle.write(rng.randbytes(BLOCK))
        artifacts.append({"path": image, "format": "raw", "virtual_size": size,
                          "sha256": sha256_file(path)})
    ami_manifests(plan, target, artifacts)
    return target


def register_request(output: Path) -> dict:
    return json.loads((output / "register-image.json").read_text())


def assert_snapshot_holds(url: str, snapshot_id: str, image: Path) -> None:
    ebs = client("ebs", url)
    listed, token = {}, None
    while True:
        page = ebs.list_snapshot_blocks(SnapshotId=snapshot_id, **(
            {"NextToken": token} if token else {}))
        listed.update({b["BlockIndex"]: b["BlockToken"] for b in page["Blocks"]})
        token = page.get("NextToken")
        if not token:
            break
    indexes, _ = nonzero_blocks(image)
    assert sorted(listed) == indexes, "exactly the non-zero blocks were sent"
    with open(image, "rb") as handle:
        for index in indexes:
            got = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index,
                                         BlockToken=listed[index])["BlockData"].read()
            assert got == os.pread(handle.fileno(), BLOCK, index * BLOCK).ljust(BLOCK, b"\0")


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

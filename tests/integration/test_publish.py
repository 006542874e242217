"""The AMI lifecycle against a moto server on 127.0.0.1 (started here, never AWS):
publish, share, copy, deregister; resuming; and a proxy that injects faults."""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from builder.aws.snapshots import BLOCK, nonzero_blocks
from builder.vm import free_port
from tests.conftest import ROOT, bundle_args, needs_root_tools, run_build

pytestmark = [pytest.mark.integration, needs_root_tools()]
REGION, OTHER = "us-east-1", "eu-west-1"


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", REGION)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def client(service: str, url: str, region: str = REGION):
    return boto3.client(service, region_name=region, endpoint_url=url)


def copy_output(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, copy_function=lambda s, d: subprocess.run(
        ["cp", "--sparse=always", s, d], check=True))
    return target


def aws(*args: str, url: str) -> subprocess.CompletedProcess:
    return run_build(*args, "--region", REGION, "--endpoint-url", url)


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


def test_publish_ebs_then_copy_and_deregister(build_recipe, moto_url: str, tmp_path: Path):
    out = copy_output(build_recipe("debian-12-ebs.yaml").output_dir, tmp_path / "ebs")
    result = aws("publish", str(out), url=moto_url)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "publish.json").read_text())
    assert set(state["snapshot_ids"]) == {"/dev/xvda", "/dev/sdf"}
    assert_snapshot_holds(moto_url, state["snapshot_ids"]["/dev/xvda"], out / "disk.raw")
    assert_snapshot_holds(moto_url, state["snapshot_ids"]["/dev/sdf"], out / "volume-sdf.raw")
    assert "zero blocks skipped" in result.stderr
    ec2 = client("ec2", moto_url)
    name = json.loads((out / "register-image.json").read_text())["Name"]
    [image] = ec2.describe_images(Owners=["self"],
                                  Filters=[{"Name": "name", "Values": [name]}])["Images"]
    assert image["ImageId"] == state["image_id"]
    permissions = ec2.describe_image_attribute(ImageId=image["ImageId"],
                                               Attribute="launchPermission")
    assert {"UserId": "123456789012"} in permissions["LaunchPermissions"]

    again = aws("publish", str(out), url=moto_url)
    assert again.returncode == 0
    assert len(ec2.describe_images(Owners=["self"], Filters=[
        {"Name": "name", "Values": [name]}])["Images"]) == 1

    copied = aws("copy", state["image_id"], "--to-region", OTHER, url=moto_url)
    assert copied.returncode == 0, copied.stderr
    copy_id = json.loads(copied.stdout)[OTHER]
    other = client("ec2", moto_url, OTHER)
    assert other.describe_images(ImageIds=[copy_id])["Images"][0]["Name"] == name

    for image_id, region in ((state["image_id"], REGION), (copy_id, OTHER)):
        gone = run_build("deregister", image_id, "--delete-snapshots", "--region", region,
                         "--endpoint-url", moto_url)
        assert gone.returncode == 0, gone.stderr
    for region, image_id in ((REGION, state["image_id"]), (OTHER, copy_id)):
        ec2_region = client("ec2", moto_url, region)
        assert not [i for i in ec2_region.describe_images(Owners=["self"])["Images"]
                    if i["ImageId"] == image_id]
    snapshots = {s["SnapshotId"] for s in ec2.describe_snapshots()["Snapshots"]}
    assert not set(state["snapshot_ids"].values()) & snapshots


def test_share_public_and_private(build_recipe, moto_url: str, tmp_path: Path) -> None:
    out = copy_output(build_recipe("debian-12-ebs.yaml").output_dir, tmp_path / "ebs")
    (out / "register-image.json").write_text(json.dumps({
        **json.loads((out / "register-image.json").read_text()), "Name": "share-test-image"}))
    assert aws("publish", str(out), url=moto_url).returncode == 0
    image_id = json.loads((out / "publish.json").read_text())["image_id"]
    ec2 = client("ec2", moto_url)
    assert aws("share", image_id, "--public", url=moto_url).returncode == 0
    attribute = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    assert {"Group": "all"} in attribute["LaunchPermissions"]
    assert aws("share", image_id, "--private", url=moto_url).returncode == 0
    attribute = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    assert attribute["LaunchPermissions"] == []


def test_dry_run_makes_no_calls(build_recipe, moto_url: str, tmp_path: Path) -> None:
    out = copy_output(build_recipe("debian-12-ebs.yaml").output_dir, tmp_path / "ebs")
    (out / "register-image.json").write_text(json.dumps({
        **json.loads((out / "register-image.json").read_text()), "Name": "dry-run-image"}))
    result = aws("publish", str(out), "--dry-run", url=moto_url)
    assert result.returncode == 0, result.stderr
    assert "would call ec2.RegisterImage" in result.stdout
    assert "secret" not in (result.stdout + result.stderr).lower()
    assert not client("ec2", moto_url).describe_images(
        Owners=["self"], Filters=[{"Name": "name", "Values": ["dry-run-image"]}])["Images"]
    assert not (out / "publish.json").exists()


def test_instance_store_publish_uploads_the_bundle(build_recipe, bundle_keys, moto_url: str,
                                                   tmp_path: Path) -> None:
    built = build_recipe("debian-12-instance-store.yaml", *bundle_args(bundle_keys))
    out = copy_output(built.output_dir, tmp_path / "is")
    s3 = client("s3", moto_url)
    s3.create_bucket(Bucket="amiforge-bundles")
    result = aws("publish", str(out), "--bucket", "amiforge-bundles", url=moto_url)
    assert result.returncode == 0, result.stderr[-3000:]
    prefix = built.manifest["name"]
    for path in sorted((out / "bundle").iterdir()):
        body = s3.get_object(Bucket="amiforge-bundles", Key=f"{prefix}/{path.name}")["Body"]
        assert body.read() == path.read_bytes()
    image_id = json.loads((out / "publish.json").read_text())["image_id"]
    image = client("ec2", moto_url).describe_images(ImageIds=[image_id])["Images"][0]
    assert image["Name"] == json.loads((out / "register-image.json").read_text())["Name"]


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


def test_publish_survives_faults_and_resumes(build_recipe, moto_url: str,
                                             tmp_path: Path) -> None:
    out = copy_output(build_recipe("debian-12-ebs.yaml").output_dir, tmp_path / "ebs")
    request = json.loads((out / "register-image.json").read_text())
    (out / "register-image.json").write_text(json.dumps({**request, "Name": "faulty-image"}))
    proxy = FaultyProxy(moto_url)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{proxy.server_address[1]}"
    try:
        # interrupted while the root image is being uploaded, then resumed
        process = subprocess.Popen(
            [sys.executable, "-m", "builder", "publish", str(out), "--region", REGION,
             "--endpoint-url", url, "--workers", "2"], cwd=ROOT, stderr=subprocess.PIPE,
            text=True)
        state_file = out / "publish.json"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if state_file.exists() and "/dev/xvda" in json.loads(
                    state_file.read_text()).get("pending", {}):
                time.sleep(0.5)  # some blocks are sent, not all
                process.send_signal(signal.SIGINT)
                break
            time.sleep(0.05)
        process.communicate(timeout=120)
        assert process.returncode == 130
        state = json.loads((out / "publish.json").read_text())
        assert "image_id" not in state and "/dev/xvda" not in state["snapshot_ids"]
        pending = state["pending"]["/dev/xvda"]["snapshot"]
        resumed = run_build("publish", str(out), "--region", REGION, "--endpoint-url", url)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"/dev/xvda: resuming {pending}" in resumed.stderr
    finally:
        proxy.shutdown()
    assert proxy.failed["500"] and proxy.failed["throttle"] and proxy.failed["dropped"] == 1
    state = json.loads((out / "publish.json").read_text())
    assert_snapshot_holds(moto_url, state["snapshot_ids"]["/dev/xvda"], out / "disk.raw")
    assert len(client("ec2", moto_url).describe_images(Owners=["self"], Filters=[
        {"Name": "name", "Values": ["faulty-image"]}])["Images"]) == 1

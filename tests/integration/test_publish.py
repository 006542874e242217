"""Publishing what a real build made, against a moto server on 127.0.0.1 (never AWS): the
snapshots hold the real images, the instance-store bundle lands in S3. The lifecycle's
own behaviour (copy, share, dry run) is tested on small images in tests/unit/test_publish.py;
the publish through a proxy that injects faults is here for its time (botocore backs off),
not because it needs a build."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.awstools import (
    REGION,
    FaultyProxy,
    assert_snapshot_holds,
    client,
    published,
    small_output,
)
from tests.conftest import ROOT, bundle_args, needs_root_tools, run_build

pytestmark = [pytest.mark.integration, needs_root_tools(),
              pytest.mark.usefixtures("fake_credentials")]


def copy_output(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, copy_function=lambda s, d: subprocess.run(
        ["cp", "--sparse=always", s, d], check=True))
    return target


def aws(*args: str, url: str) -> subprocess.CompletedProcess:
    return run_build(*args, "--region", REGION, "--endpoint-url", url)


def test_publish_the_built_ebs_image(build_recipe, aws_rules, tmp_path: Path):
    out = copy_output(build_recipe("debian-12-ebs.yaml").output_dir, tmp_path / "ebs")
    # --skip-zero-blocks: 3 GiB of images would otherwise all go into moto's memory; the
    # default (every block) is tested on small images in tests/unit/test_publish.py
    result = aws("publish", str(out), "--skip-zero-blocks", url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    state = published(out)
    assert set(state["snapshot_ids"]) == {"/dev/xvda", "/dev/sdf"}
    for device, image in (("/dev/xvda", "disk.raw"), ("/dev/sdf", "volume-sdf.raw")):
        assert_snapshot_holds(aws_rules, state["snapshot_ids"][device], out / image,
                              skipped_zeros=True)
    assert "zero blocks skipped" in result.stderr
    image = client("ec2", aws_rules.url).describe_images(ImageIds=[state["image_id"]])["Images"][0]
    assert image["Name"] == json.loads((out / "register-image.json").read_text())["Name"]


def test_instance_store_publish_uploads_the_bundle(build_recipe, bundle_keys, aws_rules,
                                                   tmp_path: Path) -> None:
    built = build_recipe("debian-12-instance-store.yaml", *bundle_args(bundle_keys))
    out = copy_output(built.output_dir, tmp_path / "is")
    s3 = client("s3", aws_rules.url)
    s3.create_bucket(Bucket="amiforge-bundles")
    result = aws("publish", str(out), "--bucket", "amiforge-bundles", url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    prefix = built.manifest["name"]
    for path in sorted((out / "bundle").iterdir()):
        body = s3.get_object(Bucket="amiforge-bundles", Key=f"{prefix}/{path.name}")["Body"]
        assert body.read() == path.read_bytes()
    image_id = published(out)["image_id"]
    image = client("ec2", aws_rules.url).describe_images(ImageIds=[image_id])["Images"][0]
    assert image["Name"] == json.loads((out / "register-image.json").read_text())["Name"]


@pytest.mark.usefixtures("fake_credentials")
def test_publish_survives_faults_and_resumes(aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "faulty-image", root_data=16 << 20)
    proxy = FaultyProxy(aws_rules.url, failure_rate=0.2)
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
            if state_file.exists() and "/dev/xvda" in published(out).get("pending", {}):
                time.sleep(0.5)  # some blocks are sent, not all
                process.send_signal(signal.SIGINT)
                break
            time.sleep(0.05)
        process.communicate(timeout=120)
        assert process.returncode == 130
        state = published(out)
        assert "image_id" not in state and "/dev/xvda" not in state["snapshot_ids"]
        pending = state["pending"]["/dev/xvda"]["snapshot"]
        resumed = run_build("publish", str(out), "--region", REGION, "--endpoint-url", url)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"/dev/xvda: resuming {pending}" in resumed.stderr
    finally:
        proxy.shutdown()
    assert proxy.failed["500"] and proxy.failed["throttle"] and proxy.failed["dropped"] == 1
    state = published(out)
    assert_snapshot_holds(aws_rules, state["snapshot_ids"]["/dev/xvda"], out / "disk.raw")
    assert len(client("ec2", aws_rules.url).describe_images(Owners=["self"], Filters=[
        {"Name": "name", "Values": ["faulty-image"]}])["Images"]) == 1

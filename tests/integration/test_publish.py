"""Publishing what a real build made, against a moto server on 127.0.0.1 (never AWS): the
snapshots hold the real images, the instance-store bundle lands in S3. The lifecycle's
own behaviour (copy, share, dry run) is tested on small images in tests/unit/test_publish.py;
the publish through a proxy that injects faults is here for its time (botocore backs off),
not because it needs a build."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from builder.aws.snapshots import BLOCK
from tests.awstools import (
    REGION,
    FaultyProxy,
    assert_snapshot_holds,
    client,
    published,
    small_output,
)
from tests.conftest import (
    FIXED_EPOCH,
    ROOT,
    bundle_args,
    copy_recipes,
    needs_root_tools,
    run_build,
)

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


def test_delta_publish_of_a_one_file_change(tmp_path: Path, suite_cache: Path, ssh_key: Path,
                                            aws_rules) -> None:
    """Two releases of the default recipe, the second with another motd (reproducible:
    only the blocks that hold it differ): the second publish starts from the first's
    snapshot and sends at most 2 % of the blocks the first sent, and the new snapshot,
    read back through the API, is the new image block for block."""
    recipes = copy_recipes(tmp_path / "recipes")
    recipe = recipes / "debian-13-minimal.yaml"
    # one name template for both releases (their partition and filesystem UUIDs come from
    # it), told apart by a variable, as a release pipeline would
    recipe.write_text(recipe.read_text().replace(
        'name: "debian-13-minimal-{{ build_date }}"',
        'name: "debian-13-minimal-{{ release }}-{{ build_date }}"'))
    public = ssh_key.with_suffix(".pub").read_text().strip()
    outs = []
    for release, motd in (("1", None), ("2", "release two: another message of the day\n")):
        if motd:
            (recipes / "files/motd").write_text(motd)
        out = tmp_path / f"release-{release}"
        built = run_build(str(recipe), "-o", str(out), "--cache-dir", str(suite_cache),
                          "--var", f"admin_key={public}", "--var", f"release={release}",
                          epoch=FIXED_EPOCH)
        assert built.returncode == 0, built.stderr[-3000:]
        outs.append(out)
    first, second = outs
    # --skip-zero-blocks: the first publish sends the image's non-zero blocks only (every
    # block, 2 GiB, would all stay in moto's memory), so the 2 % is of those
    assert aws("publish", str(first), "--skip-zero-blocks", url=aws_rules.url).returncode == 0
    result = aws("publish", str(second), "--skip-zero-blocks", "--parent", str(first),
                 "--verify", url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    parent_id = published(first)["snapshot_ids"]["/dev/xvda"]
    child_id = published(second)["snapshot_ids"]["/dev/xvda"]
    sent_first = len(aws_rules.snapshots.written[parent_id])
    sent_second = len(aws_rules.snapshots.written[child_id])
    assert 0 < sent_second <= 0.02 * sent_first, (sent_second, sent_first)
    assert published(second)["verified"]["/dev/xvda"]["ok"]
    image = second / "disk.raw"
    with open(image, "rb") as handle:
        for index in range(image.stat().st_size // BLOCK):
            expected = os.pread(handle.fileno(), BLOCK, index * BLOCK)
            got = aws_rules.volume_block(REGION, child_id, index, encrypted_volume=False)
            assert got == expected, index

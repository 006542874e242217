"""build launch against moto behind the validating layer, whose stand-in serial port
answers GetConsoleOutput: the request EC2 takes, the login prompt seen, the instance always
terminated (also when interrupted), and the console's last lines when the prompt never came."""

from __future__ import annotations

from pathlib import Path

import botocore.session
import pytest
from botocore.validate import ParamValidator

from builder.aws import launch as launching
from builder.aws.launch import LaunchOptions, check, launch, run_request
from builder.errors import BuildFailed, InputError
from tests.awstools import client

pytestmark = pytest.mark.usefixtures("fake_credentials")

BOOTED = "Debian GNU/Linux 13 debian ttyS0\n\ndebian login: "


def test_run_instances_input_is_what_ec2_takes(tmp_path: Path) -> None:
    model = botocore.session.get_session().get_service_model("ec2")
    shape = model.operation_model("RunInstances").input_shape
    for arch, default in (("x86_64", "t3.micro"), ("arm64", "t4g.micro")):
        request = run_request({"ImageId": "ami-0123456789abcdef0", "Architecture": arch},
                              LaunchOptions(subnet_id="subnet-1", key_name="k",
                                            security_groups=("sg-1",)), "#!/bin/sh\n")
        report = ParamValidator().validate(request, shape)
        assert not report.has_errors(), report.generate_report()
        assert request["InstanceType"] == default
        assert request["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only
    big = tmp_path / "user-data"
    big.write_bytes(b"x" * (16 << 10 | 1))
    with pytest.raises(InputError, match="16 KiB"):
        launching._user_data(big)


def image(aws_rules, console: list[str]) -> str:
    image_id = client("ec2", aws_rules.url).register_image(
        Name=f"launch-{len(aws_rules.images.console_scripts)}", RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 2}}],
        Architecture="x86_64", BootMode="uefi")["ImageId"]
    aws_rules.images.console_scripts[image_id] = console
    return image_id


def state_of(aws_rules, instance_id: str) -> tuple[str, dict[str, str]]:
    [reservation] = client("ec2", aws_rules.url).describe_instances(
        InstanceIds=[instance_id])["Reservations"]
    instance = reservation["Instances"][0]
    return instance["State"]["Name"], {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def test_launch_waits_for_the_login_prompt_and_terminates(aws_rules) -> None:
    image_id = image(aws_rules, ["", "[    0.000000] Linux version 6.12\n", BOOTED])
    ec2 = client("ec2", aws_rules.url)
    result = launch(ec2, image_id, LaunchOptions(timeout=60, poll=0.01))
    assert result.seen and result.terminated
    assert result.console_tail[-1] == "debian login: "
    state, tags = state_of(aws_rules, result.instance_id)
    assert state in ("shutting-down", "terminated")
    assert tags["amiforge:launch-test"] == image_id


def test_no_prompt_prints_the_console_tail_and_still_terminates(aws_rules) -> None:
    image_id = image(aws_rules, ["", "Kernel panic - not syncing: VFS: Unable to mount root"])
    result = launch(client("ec2", aws_rules.url), image_id,
                    LaunchOptions(timeout=0.5, poll=0.01))
    assert not result.seen and result.terminated
    with pytest.raises(BuildFailed, match="Kernel panic"):
        check(result, "login:")


def test_an_interrupt_terminates_the_instance(aws_rules, monkeypatch) -> None:
    image_id = image(aws_rules, [""])  # the console stays empty

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(launching.time, "sleep", interrupted)
    ec2 = client("ec2", aws_rules.url)
    with pytest.raises(KeyboardInterrupt):
        launch(ec2, image_id, LaunchOptions(timeout=60, poll=5))
    reservations = ec2.describe_instances(Filters=[
        {"Name": "tag:amiforge:launch-test", "Values": [image_id]}])["Reservations"]
    launched = [i["State"]["Name"] for r in reservations for i in r["Instances"]]
    assert launched and all(s in ("shutting-down", "terminated") for s in launched)


def test_build_launch_on_the_command_line(aws, aws_rules) -> None:
    image_id = image(aws_rules, [BOOTED])
    result = aws("launch", image_id, "--expect", "debian login", url=aws_rules.url)
    assert result.returncode == 0, result.stderr
    assert "after" in result.stdout and "terminated" in result.stderr
    bad = aws("launch", "not-an-ami", url=aws_rules.url)
    assert bad.returncode == 2 and "neither an AMI id" in bad.stderr


def test_a_lost_run_instances_answer_still_ends_the_instance(aws_rules) -> None:
    """The call went through but its answer never came (an interrupt, a read timeout):
    the instance is found by the request's ClientToken and terminated."""
    image_id = image(aws_rules, [BOOTED])
    ec2 = client("ec2", aws_rules.url)
    real = ec2.run_instances

    def lost(**request):
        real(**request)
        raise KeyboardInterrupt

    ec2.run_instances = lost
    with pytest.raises(KeyboardInterrupt):
        launch(ec2, image_id, LaunchOptions(timeout=60, poll=0.01, keep=True))
    reservations = ec2.describe_instances(Filters=[
        {"Name": "tag:amiforge:launch-test", "Values": [image_id]}])["Reservations"]
    states = [i["State"]["Name"] for r in reservations for i in r["Instances"]]
    assert states and all(s in ("shutting-down", "terminated") for s in states)


def test_what_the_instance_type_cannot_run_is_refused_first(aws_rules, tmp_path) -> None:
    ec2 = client("ec2", aws_rules.url)
    graviton = ec2.register_image(
        Name="launch-arm64", RootDeviceName="/dev/xvda", Architecture="arm64",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 2}}])["ImageId"]
    with pytest.raises(InputError, match="the AMI is arm64"):
        launch(ec2, graviton, LaunchOptions(instance_type="t3.micro", timeout=5, poll=0.1))
    gzipped = tmp_path / "user-data.gz"
    gzipped.write_bytes(b"\x1f\x8b\x08\x00binary")
    assert launching._user_data(gzipped) == b"\x1f\x8b\x08\x00binary"  # opaque to EC2


def test_the_console_tail_cannot_drive_the_terminal(aws_rules) -> None:
    image_id = image(aws_rules, ["\x1b]52;c;ZXZpbA==\x07\x1b[1A\x1b[2K==> terminated i-0\n"
                                 + "x" * 500])
    result = launch(client("ec2", aws_rules.url), image_id,
                    LaunchOptions(timeout=0.2, poll=0.01))
    assert not any("\x1b" in line for line in result.console_tail)
    assert result.console_tail[0].startswith("\\x1b]52") and len(result.console_tail[1]) == 200

"""`build launch`: the last step of the seed's lifecycle on real EC2. Start one instance of
the AMI (IMDSv2 only, tagged as amiforge's), wait until it runs, read its serial console
(GetConsoleOutput) until a login prompt or the pattern asked for shows, and terminate it:
whatever happens, an interrupt included, unless --keep.

GetConsoleOutput answers the newest output an instance's serial port wrote, base64-encoded,
and only once the instance has written some: an empty answer means "not yet".
https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_GetConsoleOutput.html"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.aws.job import say
from builder.errors import BuildFailed, InputError

LOGIN_PROMPT = r"login:"
DEFAULT_TYPES = {"x86_64": "t3.micro", "arm64": "t4g.micro"}
USER_DATA_MAX = 16 << 10  # RunInstances: "limited to 16 KB" (before base64)
TAIL_LINES = 25
LAUNCH_TAG = "amiforge:launch-test"
AMI_ID = re.compile(r"ami-[0-9a-f]{8,17}")


@dataclass(frozen=True)
class LaunchOptions:
    instance_type: str | None = None
    subnet_id: str | None = None
    key_name: str | None = None
    security_groups: tuple[str, ...] = ()
    user_data: Path | None = None
    expect: str = LOGIN_PROMPT
    timeout: float = 900
    poll: float = 15
    keep: bool = False


@dataclass
class LaunchResult:
    image_id: str
    instance_id: str | None = None
    instance_type: str = ""
    seen: bool = False
    seconds: float = 0.0
    terminated: bool = False
    console_tail: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "instance_id": self.instance_id,
                "instance_type": self.instance_type, "seen": self.seen,
                "seconds": round(self.seconds, 1), "terminated": self.terminated,
                "console_tail": self.console_tail}


def launch(ec2: Any, image_id: str, options: LaunchOptions) -> LaunchResult:
    """Run the AMI and watch its console; terminated at the end (--keep: left running)."""
    pattern = _pattern(options.expect)
    image = _image(ec2, image_id)
    request = run_request(image, options, _user_data(options.user_data))
    result = LaunchResult(image_id, instance_type=request["InstanceType"])
    started = time.monotonic()
    try:
        instance_id = ec2.run_instances(**request)["Instances"][0]["InstanceId"]
        result.instance_id = instance_id
        say(f"launched {instance_id} ({request['InstanceType']}) of {image_id}")
        ec2.get_waiter("instance_running").wait(
            InstanceIds=[instance_id],
            WaiterConfig={"Delay": 5, "MaxAttempts": max(1, int(options.timeout // 5))})
        console = _watch(ec2, instance_id, pattern, started + options.timeout, options.poll)
        result.seen = pattern.search(console) is not None
        result.console_tail = console.splitlines()[-TAIL_LINES:]
    finally:
        result.seconds = time.monotonic() - started
        if result.instance_id and not options.keep:
            ec2.terminate_instances(InstanceIds=[result.instance_id])
            result.terminated = True
            say(f"terminated {result.instance_id}")
    return result


def image_of(source: str, aws: Any) -> str:
    """The AMI to launch: an id, or the one a published output directory records for this
    account and region."""
    from builder.aws import state
    from builder.aws.publish import current_target

    if Path(source).is_dir():
        image_id = state.load(Path(source), current_target(aws)).get("image_id")
        if not isinstance(image_id, str) or not AMI_ID.fullmatch(image_id):
            raise InputError(f"{source}: not published to {current_target(aws)} "
                             "(build publish first)")
        return image_id
    if not AMI_ID.fullmatch(source):
        raise InputError(f"{source!r}: neither an AMI id (ami-...) nor an output directory")
    return source


def run_request(image: dict[str, Any], options: LaunchOptions, user_data: str | None
                ) -> dict[str, Any]:
    """RunInstances' input: one instance, IMDSv2 only, tagged, terminated on shutdown."""
    arch = image.get("Architecture", "x86_64")
    request: dict[str, Any] = {
        "ImageId": image["ImageId"], "MinCount": 1, "MaxCount": 1,
        "InstanceType": options.instance_type or DEFAULT_TYPES.get(arch, "t3.micro"),
        "ClientToken": uuid.uuid4().hex,
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "InstanceInitiatedShutdownBehavior": "terminate",
        "TagSpecifications": [{"ResourceType": "instance", "Tags": [
            {"Key": "Name", "Value": f"amiforge launch test of {image['ImageId']}"},
            {"Key": LAUNCH_TAG, "Value": image["ImageId"]}]}]}
    if options.subnet_id:
        request["SubnetId"] = options.subnet_id
    if options.key_name:
        request["KeyName"] = options.key_name
    if options.security_groups:
        request["SecurityGroupIds"] = list(options.security_groups)
    if user_data is not None:
        request["UserData"] = user_data  # (botocore base64-encodes it)
    return request


def _pattern(expect: str) -> re.Pattern[str]:
    try:
        return re.compile(expect)
    except re.error as exc:
        raise InputError(f"--expect {expect!r}: not a regular expression ({exc})") from None


def _image(ec2: Any, image_id: str) -> dict[str, Any]:
    try:
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
    except ClientError as exc:
        raise InputError(f"{image_id}: {exc.response.get('Error', {}).get('Code')}") from None
    if not images or images[0].get("State") != "available":
        state = images[0].get("State") if images else "not found"
        raise InputError(f"{image_id}: {state}, not an available AMI")
    return dict(images[0])


def _user_data(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"--user-data {path}: {exc.strerror}") from None
    if len(data) > USER_DATA_MAX:
        raise InputError(f"--user-data {path}: {len(data)} bytes, EC2 takes at most 16 KiB")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise InputError(f"--user-data {path}: not text (gzip it? EC2 takes text)") from None


def _watch(ec2: Any, instance_id: str, pattern: re.Pattern[str], deadline: float,
           poll: float) -> str:
    """The console output once ``pattern`` shows in it, or at the deadline."""
    console = ""
    while True:
        answer = ec2.get_console_output(InstanceId=instance_id)
        console = answer.get("Output") or console  # (botocore decodes the base64)
        if pattern.search(console) or time.monotonic() >= deadline:
            return console
        time.sleep(poll)


def check(result: LaunchResult, expect: str) -> None:
    """Exit 1 (with the console's last lines) unless the pattern showed."""
    if not result.seen:
        tail = "\n".join(result.console_tail) or "(the console stayed empty)"
        raise BuildFailed(f"{result.instance_id}: no {expect!r} on the console within "
                          f"{result.seconds:.0f}s; its last lines:\n{tail}")

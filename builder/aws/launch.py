"""`build launch`: the last step of the seed's lifecycle on real EC2. Start one instance of
the AMI (IMDSv2 only, tagged as amiforge's), wait until it runs, read its serial console
(GetConsoleOutput) until a login prompt or the pattern asked for shows, and terminate it:
whatever happens, an interrupt included, unless --keep.

GetConsoleOutput answers the newest output an instance's serial port wrote, base64-encoded,
and only once the instance has written some: an empty answer means "not yet".
https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_GetConsoleOutput.html"""

from __future__ import annotations

import re
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from builder.aws.job import say
from builder.errors import BuildFailed, InputError
from builder.printable import printable

LOGIN_PROMPT = r"login:"
DEFAULT_TYPES = {"x86_64": "t3.micro", "arm64": "t4g.micro"}
USER_DATA_MAX = 16 << 10  # RunInstances: "limited to 16 KB" (before base64)
TAIL_LINES = 25
LINE_MAX = 200  # characters of a console line shown
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
    """Run the AMI and watch its console. The instance is terminated at the end, and on an
    interrupt or error even with --keep; one whose RunInstances answer was lost is found by
    its ClientToken."""
    pattern = re.compile(options.expect)
    image = _image(ec2, image_id)
    request = run_request(image, options, _user_data(options.user_data))
    check_instance_type(ec2, image, request["InstanceType"])
    result = LaunchResult(image_id, instance_type=request["InstanceType"])
    started = time.monotonic()
    finished = False
    try:
        result.instance_id = ec2.run_instances(**request)["Instances"][0]["InstanceId"]
        say(f"launched {result.instance_id} ({request['InstanceType']}) of {image_id}")
        deadline = started + options.timeout
        ec2.get_waiter("instance_running").wait(
            InstanceIds=[result.instance_id],
            WaiterConfig={"Delay": 5, "MaxAttempts": max(1, int(options.timeout // 5))})
        console = _watch(ec2, result.instance_id, pattern, deadline, options.poll)
        result.seen = pattern.search(console) is not None
        result.console_tail = [printable(line[:LINE_MAX], keep_tabs=True)
                               for line in console.splitlines()[-TAIL_LINES:]]
        finished = True
    finally:
        result.seconds = time.monotonic() - started
        if not (options.keep and finished):
            _terminate(ec2, result, request["ClientToken"])
    return result


def _terminate(ec2: Any, result: LaunchResult, token: str) -> None:
    """Terminate the instance (found by its ClientToken when RunInstances' answer never
    came), with SIGINT and SIGTERM held off meanwhile: a second Ctrl-C must not leave it
    running. If EC2 refuses, say so and how to end it by hand."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        ids = [result.instance_id] if result.instance_id else _by_token(ec2, token)
        if ids:
            ec2.terminate_instances(InstanceIds=ids)
            result.instance_id = result.instance_id or ids[0]
            result.terminated = True
            say(f"terminated {', '.join(ids)}")
    except (ClientError, BotoCoreError) as exc:
        say(f"could not terminate {result.instance_id or 'the instance'} ({exc}): end it with "
            f"`aws ec2 terminate-instances --instance-ids {result.instance_id or '...'}`")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _by_token(ec2: Any, token: str) -> list[str]:
    reservations = ec2.describe_instances(
        Filters=[{"Name": "client-token", "Values": [token]}])["Reservations"]
    return [i["InstanceId"] for r in reservations for i in r["Instances"]
            if i.get("State", {}).get("Name") not in ("terminated", "shutting-down")]


def check_instance_type(ec2: Any, image: dict[str, Any], instance_type: str) -> None:
    """What EC2 would refuse only at RunInstances, or start but never boot, refused first
    (DescribeInstanceTypes): the AMI's architecture, its boot mode (Graviton: UEFI; some
    types: legacy BIOS only) and root device type must be the type's, and NitroTPM needs a
    type with it.
    https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instance-type-boot-mode.html"""
    try:
        [info] = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
    except (ClientError, ValueError):
        raise InputError(f"--instance-type {instance_type}: not an instance type EC2 "
                         "describes in this region") from None
    arch = image.get("Architecture", "x86_64")
    problems = []
    archs = info.get("ProcessorInfo", {}).get("SupportedArchitectures")
    if archs and arch not in archs:
        problems.append(f"it runs {'/'.join(archs)}, the AMI is {arch}")
    modes = info.get("SupportedBootModes")
    mode = image.get("BootMode") or ("uefi" if arch == "arm64" else "legacy-bios")
    if modes and mode != "uefi-preferred" and mode not in modes:
        problems.append(f"it boots {'/'.join(modes)}, the AMI {mode}")
    roots = info.get("SupportedRootDeviceTypes")
    if roots and image.get("RootDeviceType", "ebs") not in roots:
        problems.append(f"its root devices are {'/'.join(roots)}, the AMI's is "
                        f"{image.get('RootDeviceType')}")
    if image.get("TpmSupport") and info.get("NitroTpmSupport") == "unsupported":
        problems.append("it has no NitroTPM, which the AMI asks for")
    if problems:
        raise InputError(f"--instance-type {instance_type} cannot run {image['ImageId']}: "
                         + "; ".join(problems))


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


def run_request(image: dict[str, Any], options: LaunchOptions, user_data: bytes | None
                ) -> dict[str, Any]:
    """RunInstances' input: one instance, IMDSv2 only, tagged, terminated on shutdown."""
    arch = image.get("Architecture", "x86_64")
    if options.instance_type is None and arch not in DEFAULT_TYPES:
        raise InputError(f"{image['ImageId']} is {arch}: give --instance-type")
    tags = [{"Key": "Name", "Value": f"amiforge launch test of {image['ImageId']}"},
            {"Key": LAUNCH_TAG, "Value": image["ImageId"]}]
    request: dict[str, Any] = {
        "ImageId": image["ImageId"], "MinCount": 1, "MaxCount": 1,
        "InstanceType": options.instance_type or DEFAULT_TYPES[arch],
        "ClientToken": uuid.uuid4().hex,  # (a retry of the call starts no second instance)
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        # volumes too: a mapping may keep its volume after the instance (not deleted)
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags}
                              for kind in ("instance", "volume")]}
    if not options.keep:  # a guest that powers off is gone too
        request["InstanceInitiatedShutdownBehavior"] = "terminate"
    if options.subnet_id:
        request["SubnetId"] = options.subnet_id
    if options.key_name:
        request["KeyName"] = options.key_name
    if options.security_groups:
        request["SecurityGroupIds"] = list(options.security_groups)
    if user_data is not None:
        request["UserData"] = user_data  # (botocore base64-encodes it)
    return request


def _image(ec2: Any, image_id: str) -> dict[str, Any]:
    try:
        images = ec2.describe_images(ImageIds=[image_id], IncludeDisabled=True)["Images"]
    except ClientError as exc:
        raise InputError(f"{image_id}: {exc.response.get('Error', {}).get('Code')}") from None
    if not images or images[0].get("State") != "available":
        state = images[0].get("State") if images else "not found"
        raise InputError(f"{image_id}: {state}, not an available AMI")
    if images[0].get("DeprecationTime"):
        say(f"{image_id} is deprecated ({images[0]['DeprecationTime']}); launching it anyway")
    return dict(images[0])


def _user_data(path: Path | None) -> bytes | None:
    """The file as it is (text, or gzip: EC2 takes opaque data), at most 16 KiB before
    base64 ("limited to 16 KB, in raw form, before it is base64-encoded")."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"--user-data {path}: {exc.strerror}") from None
    if len(data) > USER_DATA_MAX:
        raise InputError(f"--user-data {path}: {len(data)} bytes, EC2 takes at most 16 KiB")
    return data


def _watch(ec2: Any, instance_id: str, pattern: re.Pattern[str], deadline: float,
           poll: float) -> str:
    """The console output once ``pattern`` shows in it, or at the deadline. Latest=True:
    without it EC2 answers the output buffered shortly after the instance started, which
    may never show the prompt (Nitro types only; plain calls elsewhere)."""
    console, latest = "", True
    while True:
        try:
            answer = ec2.get_console_output(InstanceId=instance_id, Latest=latest)
        except ClientError as exc:
            if not latest or exc.response.get("Error", {}).get("Code") != \
                    "UnsupportedOperation":
                raise
            latest = False
            continue
        console = answer.get("Output") or console  # (botocore decodes the base64)
        left = deadline - time.monotonic()
        if pattern.search(console) or left <= 0:
            return console
        time.sleep(min(poll, left))


def check(result: LaunchResult, expect: str) -> None:
    """Exit 1 (with the console's last lines) unless the pattern showed."""
    if not result.seen:
        tail = "\n".join(result.console_tail) or "(the console stayed empty)"
        raise BuildFailed(f"{result.instance_id}: no {expect!r} on the console within "
                          f"{result.seconds:.0f}s; its last lines:\n{tail}")

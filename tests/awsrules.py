"""A thin validating layer in front of moto: the rules AWS documents that moto does not
enforce and that amiforge's publish depends on. Each rule cites its AWS page; each has a
unit test (tests/unit/test_awsrules.py). It forwards everything else to moto unchanged.

It answers the few EC2 calls moto lacks that publish and copy make (EnableImageDeprecation,
the block public access states), each with AWS's documented rules.

It also models what a volume made from a snapshot reads, which no API of moto answers:
blocks nobody wrote read as zeros on an unencrypted snapshot, and as random bytes on an
encrypted one (coldsnap #395: an encrypted snapshot's unwritten blocks are not zeros)."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import http.client
import http.server
import json
import os
import re
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import boto3
from botocore.exceptions import ClientError

from tests import ebslineage

BLOCK = 512 << 10
EBS_BLOCK_DEVICE = "https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_EbsBlockDevice.html"
START_SNAPSHOT = "https://docs.aws.amazon.com/ebs/latest/APIReference/API_StartSnapshot.html"
COMPLETE_SNAPSHOT = ("https://docs.aws.amazon.com/ebs/latest/APIReference/"
                     "API_CompleteSnapshot.html")
EBS_FAQ = "https://docs.aws.amazon.com/ebs/latest/userguide/ebsapi-faq.html"
PUT_BLOCK = ("https://docs.aws.amazon.com/ebs/latest/APIReference/API_PutSnapshotBlock.html"
             "#API_PutSnapshotBlock_Errors")
ENCRYPTION_BY_DEFAULT = ("https://docs.aws.amazon.com/ebs/latest/userguide/"
                         "encryption-by-default.html")
DEFAULT_KEY = ("https://docs.aws.amazon.com/AWSEC2/latest/APIReference/"
               "API_GetEbsDefaultKmsKeyId.html")
SHARING = "https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/sharingamis-intro.html"
AMI_ENCRYPTION = "https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/AMIEncryption.html"
REGISTER_IMAGE = "https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_RegisterImage.html"
COPY_IMAGE = "https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_CopyImage.html"
DEPRECATION = ("https://docs.aws.amazon.com/AWSEC2/latest/APIReference/"
               "API_EnableImageDeprecation.html")
BLOCK_PUBLIC_ACCESS = ("https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/"
                       "block-public-access-to-amis.html")
TEN_YEARS = dt.timedelta(days=3650)
ERRORS = "https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html"
EBS_DIRECT_BLOCKS = ("https://docs.aws.amazon.com/ebs/latest/userguide/"
                     "ebsapi-elements.html")


@dataclass
class Snapshots:
    """What the layer saw of each snapshot: encrypted or not, which blocks were written."""

    encrypted: dict[str, bool] = field(default_factory=dict)
    written: dict[str, set[int]] = field(default_factory=dict)
    not_yet_found: set[str] = field(default_factory=set)  # started, not seen by a PUT yet
    completed: set[str] = field(default_factory=set)  # CompleteSnapshot seen
    keys: dict[str, str | None] = field(default_factory=dict)  # None: the default key
    parents: dict[str, str] = field(default_factory=dict)  # StartSnapshot's ParentSnapshotId
    checksums: dict[str, dict[int, str]] = field(default_factory=dict)  # PUT's, per block
    # CompleteSnapshot whose ChangedBlocksCount or checksum is not that of the blocks written
    # (AWS documents no error for it: recorded here, and the tests assert there is none)
    completion_mismatches: list[str] = field(default_factory=list)
    not_found_answers: int = 0
    # fault injection, not an AWS rule: GetSnapshotBlock of these (snapshot, index) answers
    # the block with its first byte flipped, and a checksum that matches the flipped data
    # (a snapshot that silently holds other bytes than were sent: NixOS/amis #123);
    # ("*", index): that block of every snapshot
    corrupt: set[tuple[str, int]] = field(default_factory=set)
    # and these with the byte flipped but the stored block's checksum (a transfer gone bad)
    garbled: set[tuple[str, int]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Images:
    """What moto does not keep of AMIs: deprecation times (EnableImageDeprecation is not in
    moto), how each copy was asked to be encrypted, and the accounts' block public access
    states (region -> state; "unblocked" unless a test sets it)."""

    deprecations: dict[str, str] = field(default_factory=dict)
    copies: dict[str, dict[str, object]] = field(default_factory=dict)
    # image id -> (root device, mappings as RegisterImage got them): moto keeps neither
    registered: dict[str, tuple[str, list[dict[str, object]]]] = field(default_factory=dict)
    # image id -> the attributes RegisterImage got that moto's DescribeImages leaves out
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)
    block_public_access: dict[str, str] = field(default_factory=dict)
    snapshot_block_public_access: dict[str, str] = field(default_factory=dict)
    default_keys: dict[str, str] = field(default_factory=dict)  # ModifyEbsDefaultKmsKeyId
    # a stand-in for an instance's serial port, not an AWS rule: an instance of an image
    # listed here answers GetConsoleOutput with the next text (the last one repeats; "" is
    # "nothing written yet", which EC2 answers without an Output)
    console_scripts: dict[str, list[str]] = field(default_factory=dict)
    consoles: dict[str, list[str]] = field(default_factory=dict)  # instance -> what is left
    client_tokens: dict[str, list[str]] = field(default_factory=dict)  # -> instance ids


class ValidatingProxy(http.server.ThreadingHTTPServer):
    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.upstream_url = upstream
        self.snapshots = Snapshots()
        self.images = Images()
        super().__init__(("127.0.0.1", 0), RuleHandler)

    def ec2(self, region: str):
        return self.client("ec2", region)

    @functools.cache  # noqa: B019 - one server per session; boto3 clients are thread-safe
    def client(self, service: str, region: str):
        return boto3.client(service, region_name=region, endpoint_url=self.upstream_url)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def encrypted_by_default(self, region: str) -> bool:
        """The account's setting, as moto keeps it (EnableEbsEncryptionByDefault)."""
        return bool(self.ec2(region).get_ebs_encryption_by_default()["EbsEncryptionByDefault"])

    def volume_block(self, region: str, snapshot_id: str, index: int,
                     encrypted_volume: bool = True) -> bytes:
        """What block ``index`` of a volume made from the snapshot reads. The volume is
        encrypted when the snapshot is, and may be when it is not (encryption by default
        in the launching account, RunInstances with Encrypted, a copy): an encrypted
        volume reads random bytes where nobody wrote (Bottlerocket #2169, coldsnap #470),
        a plain one zeros. By default the reader assumes the worst."""
        with self.snapshots.lock:
            held_by = ebslineage.holder(snapshot_id, index, self.snapshots.parents,
                                        self.snapshots.written)
            encrypted = self.snapshots.encrypted.get(snapshot_id, False) or encrypted_volume
        if held_by is None:
            return os.urandom(BLOCK) if encrypted else bytes(BLOCK)
        token = self.own_blocks(region, held_by)[index]
        return self.client("ebs", region).get_snapshot_block(
            SnapshotId=held_by, BlockIndex=index, BlockToken=token)["BlockData"].read()

    def own_blocks(self, region: str, snapshot_id: str) -> dict[int, str]:
        """The blocks written to the snapshot itself (moto's ListSnapshotBlocks, which knows
        no parents), index -> token; none for a snapshot moto's EBS does not know."""
        try:
            answer = self.client("ebs", region).list_snapshot_blocks(SnapshotId=snapshot_id)
        except ClientError:
            return {}
        return {b["BlockIndex"]: b["BlockToken"] for b in answer["Blocks"]}

    def snapshot_encrypted(self, region: str, snapshot_id: str) -> bool | None:
        """Whether moto's snapshot is encrypted (None: no such snapshot); records it."""
        try:
            [found] = self.ec2(region).describe_snapshots(
                SnapshotIds=[snapshot_id])["Snapshots"]
        except (ClientError, ValueError):
            return None
        with self.snapshots.lock:
            encrypted = self.snapshots.encrypted.setdefault(snapshot_id,
                                                            bool(found.get("Encrypted")))
            self.snapshots.keys.setdefault(snapshot_id, found.get("KmsKeyId"))
        return encrypted

    def volume_size(self, region: str, snapshot_id: str) -> int:
        [snapshot] = self.ec2(region).describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        return int(snapshot["VolumeSize"])


def register_image_problem(form: dict[str, list[str]]) -> str | None:
    """RegisterImage: a mapping with a SnapshotId may not carry Encrypted: "If you are
    creating a volume from a snapshot, you can't specify an encryption value ... the request
    will fail, regardless of the value"; KmsKeyId "is only supported on BlockDeviceMapping
    objects called by RunInstances, RequestSpotFleet, and RequestSpotInstances"
    (EBS_BLOCK_DEVICE)."""
    for key in form:
        if re.fullmatch(r"BlockDeviceMapping\.\d+\.Ebs\.KmsKeyId", key):
            return "The parameter KmsKeyId is not recognized"
    for key in form:
        match = re.fullmatch(r"BlockDeviceMapping\.(\d+)\.Ebs\.SnapshotId", key)
        if not match:
            continue
        prefix = f"BlockDeviceMapping.{match[1]}.Ebs."
        given = [k for k in ("Encrypted", "KmsKeyId") if prefix + k in form]
        if given:
            return (f"{' and '.join(given)} cannot be specified for a mapping created from "
                    f"a snapshot ({form[key][0]})")
    return None


def completion_problem(headers: dict[str, str], written: dict[int, str]) -> str | None:
    """CompleteSnapshot's ChangedBlocksCount is "The number of blocks that were written to
    the snapshot", and its LINEAR checksum is computed from "the checksums for each written
    block in ascending order of their block index" (COMPLETE_SNAPSHOT)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    count = lowered.get("x-amz-changedblockscount")
    if count is not None and int(count) != len(written):
        return f"ChangedBlocksCount {count}, {len(written)} blocks written"
    checksum = lowered.get("x-amz-checksum")
    if checksum is None:
        return None
    digests = b"".join(base64.b64decode(written[i]) for i in sorted(written))
    if base64.b64encode(hashlib.sha256(digests).digest()).decode() != checksum:
        return "the aggregate checksum is not that of the blocks written"
    return None


def start_snapshot_problem(body: dict[str, object]) -> str | None:
    """StartSnapshot's KmsKeyArn is "The Amazon Resource Name (ARN) of the KMS key" (pattern
    arn:aws[a-z-]*:kms:.*:[0-9]{12}:key/.*), not an id or an alias (START_SNAPSHOT)."""
    key = body.get("KmsKeyArn")
    if key is not None and not re.fullmatch(r"arn:aws[a-z\-]*:kms:.*:[0-9]{12}:key/.*",
                                            str(key)):
        return f"KmsKeyArn must be a key ARN (got {str(key)[:40]!r})"
    return None


def copy_image_problem(form: dict[str, list[str]]) -> str | None:
    """CopyImage's KmsKeyId: "If you specify a KMS key, you must also set the encrypted
    state to true" (COPY_IMAGE)."""
    if "KmsKeyId" in form and form.get("Encrypted") != ["true"]:
        return "KmsKeyId requires Encrypted=true"
    return None


def deprecation_problem(form: dict[str, list[str]], now: dt.datetime) -> str | None:
    """EnableImageDeprecation: "You can't specify a date in the past. The upper limit for
    DeprecateAt is 10 years from now" (DEPRECATION)."""
    try:
        when = dt.datetime.fromisoformat(form["DeprecateAt"][0].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return "DeprecateAt must be a timestamp (YYYY-MM-DDTHH:MM:SSZ)"
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if when < now:
        return "DeprecateAt is in the past"
    if when > now + TEN_YEARS:
        return "DeprecateAt is more than 10 years from now"
    return None


def _without_status_filter(form: dict[str, list[str]]
                           ) -> tuple[dict[str, list[str]], set[str] | None]:
    """DescribeSnapshots' form less its status filter (applied by the layer), and the
    states it asks for."""
    numbers = [k.split(".")[1] for k, v in form.items()
               if re.fullmatch(r"Filter\.\d+\.Name", k) and v == ["status"]]
    if not numbers:
        return form, None
    wanted = {v for n in numbers for k, vs in form.items()
              if k.startswith(f"Filter.{n}.Value.") for v in vs}
    kept = {k: v for k, v in form.items()
            if not any(k.startswith(f"Filter.{n}.") for n in numbers)}
    return kept, wanted


def registered_mappings(form: dict[str, list[str]]) -> tuple[str, list[dict[str, object]]]:
    """RegisterImage's root device and block device mappings, from its query form."""
    mappings: dict[int, dict[str, object]] = {}
    for key, values in form.items():
        match = re.fullmatch(r"BlockDeviceMapping\.(\d+)\.(\w+)(?:\.(\w+))?", key)
        if not match:
            continue
        mapping = mappings.setdefault(int(match[1]), {})
        if match[3]:
            mapping.setdefault(match[2], {})[match[3]] = values[0]
        else:
            mapping[match[2]] = values[0]
    return (form.get("RootDeviceName") or [""])[0], [mappings[i] for i in sorted(mappings)]


def image_tags(form: dict[str, list[str]]) -> list[dict[str, str]]:
    """RegisterImage's TagSpecification.N of ResourceType image: "To tag the AMI, the value
    for ResourceType must be image" (REGISTER_IMAGE)."""
    tags = []
    for key, values in sorted(form.items()):
        match = re.fullmatch(r"TagSpecification\.(\d+)\.ResourceType", key)
        if not match or values != ["image"]:
            continue
        prefix = f"TagSpecification.{match[1]}.Tag."
        indexes = sorted({int(k[len(prefix):].split(".")[0]) for k in form
                          if k.startswith(prefix)})
        tags += [{"Key": form[f"{prefix}{i}.Key"][0],
                  "Value": (form.get(f"{prefix}{i}.Value") or [""])[0]} for i in indexes]
    return tags


def _set_mappings(item: ET.Element, ns: str, root_device: str,
                  mappings: list[dict[str, object]], snapshots: Snapshots) -> None:
    for old in item.findall(f"{ns}blockDeviceMapping"):
        item.remove(old)
    if item.find(f"{ns}rootDeviceName") is not None:
        item.find(f"{ns}rootDeviceName").text = root_device
    listing = ET.SubElement(item, f"{ns}blockDeviceMapping")
    names = {"SnapshotId": "snapshotId", "VolumeSize": "volumeSize", "VolumeType": "volumeType",
             "DeleteOnTermination": "deleteOnTermination", "Encrypted": "encrypted",
             "Iops": "iops", "Throughput": "throughput"}
    for mapping in mappings:
        entry = ET.SubElement(listing, f"{ns}item")
        ET.SubElement(entry, f"{ns}deviceName").text = str(mapping["DeviceName"])
        if "VirtualName" in mapping:
            ET.SubElement(entry, f"{ns}virtualName").text = str(mapping["VirtualName"])
        if "NoDevice" in mapping:
            ET.SubElement(entry, f"{ns}noDevice").text = ""
        ebs = dict(mapping.get("Ebs") or {})
        if not ebs:
            continue
        if "SnapshotId" in ebs:  # a snapshot's volume is as encrypted as the snapshot
            ebs["Encrypted"] = str(snapshots.encrypted.get(str(ebs["SnapshotId"]),
                                                           False)).lower()
        element = ET.SubElement(entry, f"{ns}ebs")
        for key, value in ebs.items():
            if key in names:
                ET.SubElement(element, f"{ns}{names[key]}").text = str(value)


class RuleHandler(http.server.BaseHTTPRequestHandler):
    server: ValidatingProxy

    def log_message(self, *args: object) -> None:
        pass

    def _region(self) -> str:
        match = re.search(r"Credential=[^/]+/\d+/([^/]+)/", self.headers.get("Authorization", ""))
        return match[1] if match else "us-east-1"

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.upstream_path = self.path
        if self.command == "POST" and self.path.rstrip("/") == "/snapshots":
            request = json.loads(body or b"{}")
            problem = start_snapshot_problem(request)
            if problem:
                return self._json_error(400, "ValidationException", problem)
            if "ParentSnapshotId" in request and self._parent_refused(request):
                return None
        if self.command == "GET" and self._answered_from_lineage():
            return None
        if self._not_found_yet():
            return self._json_error(404, "ResourceNotFoundException",
                                    "The snapshot was not found")
        form: dict[str, list[str]] = {}
        if self.command == "POST" and self.path == "/":
            form = urllib.parse.parse_qs(body.decode(errors="replace"))
            action = (form.get("Action") or [""])[0]
            problem = {"RegisterImage": register_image_problem,
                       "CopyImage": copy_image_problem}.get(action, lambda f: None)(form)
            if problem:
                return self._ec2_error("InvalidParameterCombination", problem)
            if action in ("RegisterImage", "CopyImage") and self._name_taken(form):
                return self._ec2_error("InvalidAMIName.Duplicate", "AMI name "
                                       f"{form['Name'][0]} is already in use by an AMI")
            problem = self._sharing_problem(action, form)
            if problem:
                return self._ec2_error("InvalidParameter", problem)
            if action in self.ANSWERED:
                return getattr(self, f"_answer_{action}")(form)
            if action == "GetConsoleOutput" and \
                    (form.get("InstanceId") or [""])[0] in self.server.images.consoles:
                return self._console_output(form["InstanceId"][0],
                                            form.get("Latest") == ["true"])
        wanted_states = None
        if form.get("Action") == ["DescribeInstances"] and self._by_client_token(form):
            body = urllib.parse.urlencode(form, doseq=True).encode()
            self.headers.replace_header("Content-Length", str(len(body)))
        if form.get("Action") == ["DescribeSnapshots"]:
            form, wanted_states = _without_status_filter(form)
            body = urllib.parse.urlencode(form, doseq=True).encode()
            self.headers.replace_header("Content-Length", str(len(body)))
        status, headers, data = self._forward(body)
        if status < 300 and form.get("Action") == ["DescribeSnapshots"]:
            data = self._snapshot_states(data, wanted_states)
        self._observe(body, status, data)
        if status < 300 and self.command == "GET":
            headers, data = self._corrupted(headers, data)
        if status < 300 and form.get("Action") == ["RegisterImage"]:
            image_id = re.search(rb"<imageId>([^<]+)</imageId>", data)[1].decode()
            self.server.images.registered[image_id] = registered_mappings(form)
            self.server.images.attributes[image_id] = {
                tag: form[name][0] for name, tag in (("Architecture", "architecture"),
                                                     ("TpmSupport", "tpmSupport"))
                if name in form}
            tags = image_tags(form)  # moto's RegisterImage drops TagSpecifications
            if tags:
                self.server.ec2(self._region()).create_tags(Resources=[image_id], Tags=tags)
        if status < 300 and form.get("Action") == ["CopyImage"]:
            self._copied(form, data)
        if status < 300 and form.get("Action") == ["RunInstances"]:
            script = self.server.images.console_scripts.get((form.get("ImageId") or [""])[0])
            launched = [i.decode() for i in
                        re.findall(rb"<instanceId>([^<]+)</instanceId>", data)]
            self.server.images.client_tokens[(form.get("ClientToken") or [""])[0]] = launched
            for instance_id in launched:
                if script is not None:
                    self.server.images.consoles[instance_id] = list(script)
        if status < 300 and form.get("Action") == ["DescribeImages"]:
            data = self._as_registered(data)
        self._reply(status, headers, data)

    # --- incremental snapshots (tests/ebslineage.py) -----------------------------------

    def _parent_refused(self, request: dict[str, object]) -> bool:
        """StartSnapshot with a parent: the parent must exist, and the encryption asked must
        be one AWS accepts with it (ebslineage.parent_problem)."""
        parent = str(request["ParentSnapshotId"])
        snapshots = self.server.snapshots
        with snapshots.lock:
            encrypted = snapshots.encrypted.get(parent)
            pending = parent in snapshots.written and parent not in snapshots.completed
        if encrypted is None:  # not made through the layer (CreateSnapshot, a copy)
            encrypted = self.server.snapshot_encrypted(self._region(), parent)
        if encrypted is None:
            self._json_error(404, "ResourceNotFoundException",
                             f"The parent snapshot {parent} was not found")
            return True
        if pending:  # "Can a snapshot be accessed ... if it has a pending status? No." (EBS_FAQ)
            self._json_error(400, "ValidationException", f"The parent snapshot {parent} is "
                             "pending")
            return True
        problem = ebslineage.parent_problem(request, bool(encrypted),
                                            self.server.encrypted_by_default(self._region()))
        if problem:
            self._json_error(400, "ValidationException", problem)
        return problem is not None

    def _answered_from_lineage(self) -> bool:
        """ListSnapshotBlocks and ListChangedBlocks answered over the snapshots' lineage;
        GetSnapshotBlock of a block the snapshot inherited is read from the ancestor that
        holds it."""
        path, _, query = self.path.partition("?")
        params = urllib.parse.parse_qs(query)
        listing = re.fullmatch(r"/snapshots/([^/]+)/(blocks|changedblocks)", path)
        if listing:
            self._answer_listing(listing[1], listing[2], params)
            return True
        block = re.fullmatch(r"/snapshots/([^/]+)/blocks/(\d+)", path)
        if block:
            snapshots = self.server.snapshots
            with snapshots.lock:
                held_by = ebslineage.holder(block[1], int(block[2]), snapshots.parents,
                                            snapshots.written)
                pending = block[1] in snapshots.written and block[1] not in snapshots.completed
            if pending:
                self._json_error(400, "ValidationException", ebslineage.PENDING)
                return True
            if held_by not in (None, block[1]):
                self.upstream_path = f"/snapshots/{held_by}/blocks/{block[2]}?{query}"
        return False

    def _answer_listing(self, snapshot_id: str, kind: str, params: dict[str, list[str]]
                        ) -> None:
        """Blocks of the whole lineage, BlockSize 524288 (the EBS direct APIs' blocks are
        512 KiB, EBS_DIRECT_BLOCKS "Block indexes"; moto answers 512), paginated."""
        region = self._region()
        first_id = (params.get("firstSnapshotId") or [None])[0]
        named = [snapshot_id, *([first_id] if first_id else [])]
        try:
            volume_size = self.server.volume_size(region, snapshot_id)
            for other in named[1:]:
                self.server.volume_size(region, other)
        except ClientError:
            return self._json_error(404, "ResourceNotFoundException",
                                    f"The snapshot {' or '.join(named)} was not found")
        snapshots = self.server.snapshots
        with snapshots.lock:
            parents = dict(snapshots.parents)
            pending = [s for s in named if s in snapshots.written and s not in snapshots.completed]
        problem = ebslineage.listing_problem(kind, snapshot_id, first_id, parents, pending)
        if problem:
            return self._json_error(400, "ValidationException", problem)

        def blocks_of(member: str) -> dict[int, tuple[str, str]]:
            return ebslineage.effective_blocks(
                member, parents, lambda s: self.server.own_blocks(region, s))

        second = blocks_of(snapshot_id)
        if kind == "blocks":
            key, entries = "Blocks", [{"BlockIndex": i, "BlockToken": token}
                                      for i, (token, _) in sorted(second.items())]
        else:
            key = "ChangedBlocks"
            entries = ebslineage.changed_blocks(blocks_of(str(first_id)), second)
        paged = ebslineage.page(entries, params)
        if isinstance(paged, str):
            return self._json_error(400, "ValidationException", paged)
        chosen, next_token = paged
        answer = {key: chosen, "VolumeSize": volume_size, "BlockSize": BLOCK,
                  **({"NextToken": next_token} if next_token else {})}
        self._reply(200, [("Content-Type", "application/json")], json.dumps(answer).encode())
        return None

    def _not_found_yet(self) -> bool:
        """A snapshot is not visible to PutSnapshotBlock at once: the first PUT after
        StartSnapshot answers ResourceNotFoundException (PUT_BLOCK's errors; seen on real
        EBS for up to minutes after StartSnapshot: awslabs/coldsnap#43)."""
        match = re.fullmatch(r"/snapshots/([^/]+)/blocks/\d+", self.path.split("?")[0])
        if self.command != "PUT" or not match:
            return False
        snapshots = self.server.snapshots
        with snapshots.lock:
            if match[1] not in snapshots.not_yet_found:
                return False
            snapshots.not_yet_found.discard(match[1])
            snapshots.not_found_answers += 1
            return True

    # --- EC2 calls moto does not have --------------------------------------------------

    ANSWERED = ("EnableImageDeprecation", "GetImageBlockPublicAccessState",
                "GetSnapshotBlockPublicAccessState", "GetEbsDefaultKmsKeyId",
                "ModifyEbsDefaultKmsKeyId", "ResetEbsDefaultKmsKeyId")

    def _default_key(self) -> str:
        """The account's default key for EBS encryption: the AWS managed key aws/ebs until
        ModifyEbsDefaultKmsKeyId sets one (DEFAULT_KEY)."""
        return self.server.images.default_keys.get(
            self._region(), f"arn:aws:kms:{self._region()}:123456789012:alias/aws/ebs")

    def _answer_GetEbsDefaultKmsKeyId(self, form: dict) -> None:
        self._ec2_reply("GetEbsDefaultKmsKeyId", f"<kmsKeyId>{self._default_key()}</kmsKeyId>")

    def _answer_ModifyEbsDefaultKmsKeyId(self, form: dict) -> None:
        self.server.images.default_keys[self._region()] = form["KmsKeyId"][0]
        self._ec2_reply("ModifyEbsDefaultKmsKeyId", f"<kmsKeyId>{form['KmsKeyId'][0]}</kmsKeyId>")

    def _answer_ResetEbsDefaultKmsKeyId(self, form: dict) -> None:
        self.server.images.default_keys.pop(self._region(), None)
        self._ec2_reply("ResetEbsDefaultKmsKeyId", f"<kmsKeyId>{self._default_key()}</kmsKeyId>")

    def _by_client_token(self, form: dict[str, list[str]]) -> bool:
        """DescribeInstances' filter client-token ("The idempotency token you provided when
        you launched the instance", API_DescribeInstances), which moto lacks: made an
        instance-id filter of the instances RunInstances started with that token."""
        names = [k for k, v in form.items()
                 if re.fullmatch(r"Filter\.\d+\.Name", k) and v == ["client-token"]]
        for name in names:
            number = name.split(".")[1]
            tokens = [v for k, vs in form.items() if k.startswith(f"Filter.{number}.Value.")
                      for v in vs]
            ids = [i for t in tokens for i in self.server.images.client_tokens.get(t, [])]
            for key in [k for k in form if k.startswith(f"Filter.{number}.Value.")]:
                del form[key]
            form[name] = ["instance-id"]
            for index, instance_id in enumerate(ids or ["i-00000000000000000"], 1):
                form[f"Filter.{number}.Value.{index}"] = [instance_id]
        return bool(names)

    def _console_output(self, instance_id: str, latest: bool) -> None:
        """GetConsoleOutput: the output base64-encoded; none until the instance wrote any;
        by default "buffered information that was posted shortly after an instance
        transition state" (here: the first text, forever), with Latest the newest (here:
        the next text) (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/
        API_GetConsoleOutput.html)."""
        left = self.server.images.consoles[instance_id]
        text = left.pop(0) if latest and len(left) > 1 else left[0]
        output = (f"<output>{base64.b64encode(text.encode()).decode()}</output>"
                  if text else "")
        self._ec2_reply("GetConsoleOutput", f"<instanceId>{instance_id}</instanceId>"
                        f"<timestamp>2026-12-01T00:00:00Z</timestamp>{output}")

    def _shares_under_aws_key(self, snapshot_id: str) -> bool:
        snapshots = self.server.snapshots
        return (snapshots.encrypted.get(snapshot_id, False)
                and (snapshots.keys.get(snapshot_id) or self._default_key())
                .endswith("alias/aws/ebs"))

    def _sharing_problem(self, action: str, form: dict[str, list[str]]) -> str | None:
        """SHARING: "AMIs with encrypted volumes cannot be made public"; snapshots
        encrypted with the AWS managed key cannot be shared (ModifySnapshotAttribute:
        "Encrypted snapshots and snapshots with Amazon Web Services Marketplace product
        codes cannot be made public. Snapshots encrypted with your default KMS key cannot
        be shared with other accounts.")."""
        values = [v for k, vs in form.items() for v in vs]
        if action == "ModifyImageAttribute" and any(
                k.startswith("LaunchPermission.Add.") for k in form):
            image_id = form["ImageId"][0]
            _, mappings = self.server.images.registered.get(image_id, ("", []))
            snaps = [str(m["Ebs"]["SnapshotId"]) for m in mappings
                     if "SnapshotId" in (m.get("Ebs") or {})]
            adds = {k: v for k, v in form.items() if k.startswith("LaunchPermission.Add.")}
            public = ["all"] in [v for k, v in adds.items() if k.endswith(".Group")]
            others = any(not k.endswith(".Group") for k in adds)
            if public and any(self.server.snapshots.encrypted.get(s) for s in snaps):
                return "AMIs with encrypted volumes cannot be made public"
            if others and any(self._shares_under_aws_key(s) for s in snaps):
                return "AMIs whose snapshots use the AWS managed key cannot be shared"
        if action == "ModifySnapshotAttribute" and form.get("OperationType") == ["add"]:
            snapshot_id = form["SnapshotId"][0]
            public = any(k.startswith("UserGroup.") for k in form) and "all" in values
            users = any(k.startswith("UserId.") for k in form)
            if public and self.server.snapshots.encrypted.get(snapshot_id):
                return "Encrypted snapshots cannot be made public"
            if users and self._shares_under_aws_key(snapshot_id):
                return "Snapshots encrypted with your default KMS key cannot be shared"
        return None

    def _snapshot_states(self, data: bytes, wanted: set[str] | None) -> bytes:
        """A snapshot started with the EBS direct API is "pending" until CompleteSnapshot
        (START_SNAPSHOT); moto shows it "completed" at once. The status filter is applied
        here, on the states EBS would show. It is encrypted as StartSnapshot made it (asked,
        by default, or its parent's), with its key; moto ignores StartSnapshot's encryption."""
        root = ET.fromstring(data)
        ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        ET.register_namespace("", ns.strip("{}"))
        snapshots = self.server.snapshots
        for listing in root.iter(f"{ns}snapshotSet"):
            for item in list(listing):
                snapshot_id = item.findtext(f"{ns}snapshotId")
                state = item.find(f"{ns}status")
                if (state is not None and snapshot_id in snapshots.written
                        and snapshot_id not in snapshots.completed):
                    state.text = "pending"
                if snapshots.encrypted.get(snapshot_id):
                    self._show_encrypted(item, ns, snapshots.keys.get(snapshot_id))
                if wanted is not None and (state is None or state.text not in wanted):
                    listing.remove(item)
        return ET.tostring(root, xml_declaration=True, encoding="utf-8")

    def _show_encrypted(self, item: ET.Element, ns: str, key: str | None) -> None:
        encrypted = item.find(f"{ns}encrypted")
        if encrypted is None:
            encrypted = ET.SubElement(item, f"{ns}encrypted")
        encrypted.text = "true"
        if item.find(f"{ns}kmsKeyId") is None:
            ET.SubElement(item, f"{ns}kmsKeyId").text = key or self._default_key()

    def _answer_EnableImageDeprecation(self, form: dict[str, list[str]]) -> None:
        image_id = (form.get("ImageId") or [""])[0]
        problem = deprecation_problem(form, dt.datetime.now(dt.UTC))
        if problem:
            return self._ec2_error("InvalidParameterValue", problem)
        if not self.server.ec2(self._region()).describe_images(
                Filters=[{"Name": "image-id", "Values": [image_id]}])["Images"]:
            return self._ec2_error("InvalidAMIID.NotFound", f"The image id '[{image_id}]' "
                                   "does not exist")
        self.server.images.deprecations[image_id] = form["DeprecateAt"][0]
        self._ec2_reply("EnableImageDeprecation", "<return>true</return>")

    def _answer_GetImageBlockPublicAccessState(self, form: dict) -> None:
        state = self.server.images.block_public_access.get(self._region(), "unblocked")
        self._ec2_reply("GetImageBlockPublicAccessState",
                        f"<imageBlockPublicAccessState>{state}</imageBlockPublicAccessState>")

    def _answer_GetSnapshotBlockPublicAccessState(self, form: dict) -> None:
        state = self.server.images.snapshot_block_public_access.get(self._region(),
                                                                    "unblocked")
        self._ec2_reply("GetSnapshotBlockPublicAccessState", f"<state>{state}</state>")

    def _name_taken(self, form: dict[str, list[str]]) -> bool:
        """AMI names are unique per account and region (InvalidAMIName.Duplicate, ERRORS);
        moto registers and copies any number of AMIs of one name."""
        name = (form.get("Name") or [""])[0]
        images = self.server.ec2(self._region()).describe_images(
            Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]
        return any(i.get("State") != "deregistered" for i in images)

    def _as_registered(self, data: bytes) -> bytes:
        """DescribeImages as EC2 answers it: the block device mappings and root device the
        AMI was registered (or copied) with, which moto replaces with its own, and the root
        device's type ("ebs" when the root device's mapping is an EBS volume, else
        "instance-store"; moto says "standard"), its Architecture and TpmSupport (moto
        drops both); the deprecation time EnableImageDeprecation
        set; a copy's source (SourceImageId)."""
        root = ET.fromstring(data)
        ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
        ET.register_namespace("", ns.strip("{}"))
        images = self.server.images
        for item in list(root.iter(f"{ns}item")):
            image_id = item.findtext(f"{ns}imageId")
            if image_id is None:
                continue
            if image_id in images.registered:
                root_device, mappings = images.registered[image_id]
                _set_mappings(item, ns, root_device, mappings, self.server.snapshots)
                on_ebs = any(m.get("DeviceName") == root_device and m.get("Ebs")
                             for m in mappings)
                kind = item.find(f"{ns}rootDeviceType")
                if kind is not None:
                    kind.text = "ebs" if on_ebs else "instance-store"
            for tag, value in images.attributes.get(image_id, {}).items():
                element = item.find(f"{ns}{tag}")
                if element is None:
                    element = ET.SubElement(item, f"{ns}{tag}")
                element.text = value
            extra = {"deprecationTime": images.deprecations.get(image_id)}
            if image_id in images.copies:
                copy = images.copies[image_id]
                extra.update(sourceImageId=copy["source"],
                             sourceImageRegion=copy["source_region"])
            for tag, value in extra.items():
                if value is not None:
                    ET.SubElement(item, f"{ns}{tag}").text = str(value)
        return ET.tostring(root, xml_declaration=True, encoding="utf-8")

    def _copied(self, form: dict[str, list[str]], data: bytes) -> None:
        """Record how the copy was asked to be encrypted; CopyImageTags "Indicates whether
        to include your user-defined AMI tags when copying the AMI" (COPY_IMAGE): moto
        ignores it, the layer copies the tags."""
        copy_id = re.search(rb"<imageId>([^<]+)</imageId>", data)[1].decode()
        source, source_region = form["SourceImageId"][0], form["SourceRegion"][0]
        encrypted = form.get("Encrypted") == ["true"]
        self.server.images.copies[copy_id] = {
            "region": self._region(), "source": source, "source_region": source_region,
            "encrypted": encrypted, "kms_key_id": (form.get("KmsKeyId") or [None])[0]}
        if source in self.server.images.registered:  # new snapshots, in this region
            root_device, mappings = self.server.images.registered[source]
            key = (form.get("KmsKeyId") or [None])[0]
            copied = [self._copy_snapshot(m, encrypted, key) for m in mappings]
            self.server.images.registered[copy_id] = (root_device, copied)
        if form.get("CopyImageTags") == ["true"]:
            tags = self.server.ec2(source_region).describe_images(
                ImageIds=[source])["Images"][0].get("Tags", [])
            user_tags = [t for t in tags if not t["Key"].startswith("aws:")]
            if user_tags:
                self.server.ec2(self._region()).create_tags(Resources=[copy_id],
                                                            Tags=user_tags)

    def _observe(self, body: bytes, status: int, data: bytes) -> None:
        snapshots = self.server.snapshots
        if status >= 300:
            return
        if self.command == "POST" and self.path.rstrip("/") == "/snapshots":
            # StartSnapshot: Encrypted, or the account's encryption by default, which
            # "you cannot override" per snapshot (START_SNAPSHOT, ENCRYPTION_BY_DEFAULT)
            request = json.loads(body or b"{}")
            snapshot_id = json.loads(data)["SnapshotId"]
            encrypted = bool(request.get("Encrypted")) or \
                self.server.encrypted_by_default(self._region())
            with snapshots.lock:
                parent = request.get("ParentSnapshotId")
                if parent:  # the parent's encryption and key (ebslineage.ENCRYPTION_OUTCOMES)
                    snapshots.parents[snapshot_id] = parent
                    encrypted = snapshots.encrypted[parent]
                snapshots.encrypted[snapshot_id] = encrypted
                # the key is fixed when the snapshot is made: asked, the account's default
                # then, or the parent's ("the same KMS key as the parent snapshot")
                snapshots.keys[snapshot_id] = snapshots.keys.get(parent) if parent else \
                    request.get("KmsKeyArn") or (self._default_key() if encrypted else None)
                snapshots.written[snapshot_id] = set()
                snapshots.not_yet_found.add(snapshot_id)
        done = re.fullmatch(r"/snapshots/completion/([^/?]+)", self.path.split("?")[0])
        if self.command == "POST" and done:
            problem = completion_problem(dict(self.headers),
                                         snapshots.checksums.get(done[1], {}))
            with snapshots.lock:
                snapshots.completed.add(done[1])
                if problem:
                    snapshots.completion_mismatches.append(f"{done[1]}: {problem}")
        match = re.fullmatch(r"/snapshots/([^/]+)/blocks/(\d+)", self.path.split("?")[0])
        if self.command == "PUT" and match:
            with snapshots.lock:
                snapshots.written.setdefault(match[1], set()).add(int(match[2]))
                snapshots.checksums.setdefault(match[1], {})[int(match[2])] = \
                    self.headers.get("x-amz-Checksum", "")

    def _corrupted(self, headers: list[tuple[str, str]], data: bytes
                   ) -> tuple[list[tuple[str, str]], bytes]:
        match = re.fullmatch(r"/snapshots/([^/]+)/blocks/(\d+)", self.path.split("?")[0])
        key = (match[1], int(match[2])) if match else None
        with self.server.snapshots.lock:
            corrupt = key is not None and bool({key, ("*", key[1])} &
                                               self.server.snapshots.corrupt)
            garbled = key in self.server.snapshots.garbled
        if not (corrupt or garbled) or not data:
            return headers, data
        data = bytes([data[0] ^ 0xFF]) + data[1:]
        if garbled:
            return headers, data
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        return [(k, checksum if k.lower() == "x-amz-checksum" else v) for k, v in headers], data

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        upstream.request(self.command, self.upstream_path, body, dict(self.headers))
        response = upstream.getresponse()
        return response.status, response.getheaders(), response.read()

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json_error(self, status: int, code: str, message: str) -> None:
        data = json.dumps({"Message": message, "Reason": code}).encode()
        self._reply(status, [("Content-Type", "application/json"),
                             ("x-amzn-ErrorType", code)], data)

    def _copy_snapshot(self, mapping: dict[str, object], encrypted: bool,
                       key_arn: str | None) -> dict[str, object]:
        """CopyImage copies each snapshot into the destination region, encrypted when the
        copy is asked to be or the source snapshot was (COPY_IMAGE)."""
        ebs = dict(mapping.get("Ebs") or {})
        if "SnapshotId" not in ebs:
            return mapping
        ec2 = self.server.ec2(self._region())
        volume = ec2.create_volume(Size=int(ebs.get("VolumeSize") or 1),
                                   AvailabilityZone=f"{self._region()}a")["VolumeId"]
        snapshot_id = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
        snapshots, source = self.server.snapshots, str(ebs["SnapshotId"])
        by_default = self.server.encrypted_by_default(self._region())
        with snapshots.lock:  # COPY_IMAGE, and AMI_ENCRYPTION's table of outcomes
            was = snapshots.encrypted.get(source, False)
            snapshots.encrypted[snapshot_id] = encrypted or was or by_default
            snapshots.keys[snapshot_id] = key_arn
            snapshots.completed.add(snapshot_id)
        return {**mapping, "Ebs": {**ebs, "SnapshotId": snapshot_id}}

    def _ec2_reply(self, action: str, inner: str) -> None:
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><{action}Response xmlns='
               f'"http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>amiforge-rules'
               f"</requestId>{inner}</{action}Response>").encode()
        self._reply(200, [("Content-Type", "text/xml")], xml)

    def _ec2_error(self, code: str, message: str) -> None:
        xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error>"
               f"<Code>{code}</Code><Message>{message}</Message></Error></Errors>"
               f"<RequestID>amiforge-rules</RequestID></Response>").encode()
        self._reply(400, [("Content-Type", "text/xml")], xml)

    do_GET = do_PUT = do_POST = do_DELETE = _handle

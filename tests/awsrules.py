"""A thin validating layer in front of moto: the rules AWS documents that moto does not
enforce and that amiforge's publish depends on. Each rule cites its AWS page; each has a
unit test (tests/unit/test_awsrules.py). It forwards everything else to moto unchanged.

It also models what a volume made from a snapshot reads, which no API of moto answers:
blocks nobody wrote read as zeros on an unencrypted snapshot, and as random bytes on an
encrypted one (coldsnap #395: an encrypted snapshot's unwritten blocks are not zeros)."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass, field

import boto3

BLOCK = 512 << 10
EBS_BLOCK_DEVICE = "https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_EbsBlockDevice.html"
START_SNAPSHOT = "https://docs.aws.amazon.com/ebs/latest/APIReference/API_StartSnapshot.html"
ENCRYPTION_BY_DEFAULT = ("https://docs.aws.amazon.com/ebs/latest/userguide/"
                         "encryption-by-default.html")


@dataclass
class Snapshots:
    """What the layer saw of each snapshot: encrypted or not, which blocks were written."""

    encrypted: dict[str, bool] = field(default_factory=dict)
    written: dict[str, set[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ValidatingProxy(http.server.ThreadingHTTPServer):
    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.upstream_url = upstream
        self.snapshots = Snapshots()
        super().__init__(("127.0.0.1", 0), RuleHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def encrypted_by_default(self, region: str) -> bool:
        """The account's setting, as moto keeps it (EnableEbsEncryptionByDefault)."""
        ec2 = boto3.client("ec2", region_name=region, endpoint_url=self.upstream_url)
        return bool(ec2.get_ebs_encryption_by_default()["EbsEncryptionByDefault"])

    def volume_block(self, region: str, snapshot_id: str, index: int) -> bytes:
        """What block ``index`` of a volume made from the snapshot reads."""
        with self.snapshots.lock:
            written = index in self.snapshots.written.get(snapshot_id, set())
            encrypted = self.snapshots.encrypted.get(snapshot_id, False)
        if not written:  # encrypted: random, as AWS; else zeros
            return os.urandom(BLOCK) if encrypted else bytes(BLOCK)
        ebs = boto3.client("ebs", region_name=region, endpoint_url=self.upstream_url)
        blocks = {b["BlockIndex"]: b["BlockToken"] for b in ebs.list_snapshot_blocks(
            SnapshotId=snapshot_id, StartingBlockIndex=index, MaxResults=100)["Blocks"]}
        return ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index,
                                      BlockToken=blocks[index])["BlockData"].read()


def register_image_problem(form: dict[str, list[str]]) -> str | None:
    """RegisterImage: a mapping with a SnapshotId may not carry Encrypted or KmsKeyId:
    "If you are creating a volume from a snapshot, you can't specify an encryption value
    ... the request will fail, regardless of the value" (EBS_BLOCK_DEVICE)."""
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


class RuleHandler(http.server.BaseHTTPRequestHandler):
    server: ValidatingProxy

    def log_message(self, *args: object) -> None:
        pass

    def _region(self) -> str:
        match = re.search(r"Credential=[^/]+/\d+/([^/]+)/", self.headers.get("Authorization", ""))
        return match[1] if match else "us-east-1"

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "POST" and self.path == "/":
            form = urllib.parse.parse_qs(body.decode(errors="replace"))
            if form.get("Action") == ["RegisterImage"]:
                problem = register_image_problem(form)
                if problem:
                    return self._ec2_error("InvalidParameterCombination", problem)
        status, headers, data = self._forward(body)
        self._observe(body, status, data)
        self._reply(status, headers, data)

    def _observe(self, body: bytes, status: int, data: bytes) -> None:
        snapshots = self.server.snapshots
        if status >= 300:
            return
        if self.command == "POST" and self.path.rstrip("/") == "/snapshots":
            # StartSnapshot: Encrypted, or the account's encryption by default, which
            # "you cannot override" per snapshot (START_SNAPSHOT, ENCRYPTION_BY_DEFAULT)
            asked = bool(json.loads(body or b"{}").get("Encrypted"))
            snapshot_id = json.loads(data)["SnapshotId"]
            encrypted = asked or self.server.encrypted_by_default(self._region())
            with snapshots.lock:
                snapshots.encrypted[snapshot_id] = encrypted
                snapshots.written[snapshot_id] = set()
        match = re.fullmatch(r"/snapshots/([^/]+)/blocks/(\d+)", self.path.split("?")[0])
        if self.command == "PUT" and match:
            with snapshots.lock:
                snapshots.written.setdefault(match[1], set()).add(int(match[2]))

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        upstream.request(self.command, self.path, body, dict(self.headers))
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

    def _ec2_error(self, code: str, message: str) -> None:
        xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error>"
               f"<Code>{code}</Code><Message>{message}</Message></Error></Errors>"
               f"<RequestID>amiforge-rules</RequestID></Response>").encode()
        self._reply(400, [("Content-Type", "text/xml")], xml)

    do_GET = do_PUT = do_POST = do_DELETE = _handle

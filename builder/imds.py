"""An instance metadata service for EC2-like boots: IMDSv2 only, as AWS recommends and as
`build launch` configures real instances (HttpTokens=required).

It serves on 127.0.0.1; the guest reaches it at 169.254.169.254 through QEMU's user network,
whose ``guestfwd=...-cmd:`` runs ``builder/imds_relay.py`` for each guest connection: that
process relays the connection here. Each request is recorded (method,
path, status, whether it carried a valid token) for tests and ``build boot``'s summary.

The guest is not trusted (amiforge boots images built from pull requests): at most
MAX_RELAYS connections are relayed at once (a relay takes a free slot lock or leaves at
once), an idle connection is closed after IDLE_SECONDS, a request whose length or TTL is
not a plain number in range is answered 400 and its connection closed (no body is read
beyond 64 KiB, none is ever parsed as a request), tokens and the request log are bounded,
and the service only ever answers from its tree. The VM's network is restricted to the
forwarded ports (``vm.user_network``), so the guest cannot reach the host's other
services.

The rules are AWS's ("Use the Instance Metadata Service to access instance metadata",
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html
and "Use IMDSv2", .../instance-metadata-v2-how-it-works.html):

- a session token comes from ``PUT /latest/api/token`` with the header
  ``X-aws-ec2-metadata-token-ttl-seconds`` of 1 to 21600 seconds (else 400);
- a PUT carrying ``X-Forwarded-For`` is refused (403): tokens are not handed to proxies;
- with tokens required, a GET without a valid, unexpired token gets 401;
- a directory lists its entries one per line, sub-directories ending in "/";
  ``public-keys/`` lists ``0=KEY-NAME``.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

IMDS_ADDRESS = "169.254.169.254"
# QEMU's user network must contain the address it forwards: the guest's network is this
# /24, so it finds the service on its own link, as an instance does.
GUEST_NETWORK = "169.254.169.0/24"
GUEST_ADDRESS = "169.254.169.15"  # QEMU's first DHCP lease
GUEST_MAC = "52:54:00:12:34:56"   # QEMU's default for the first NIC
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL = 21600
MAX_USER_DATA = 16 * 1024  # AWS: user data is limited to 16 KB, before base64 encoding
RELAY = Path(__file__).resolve().with_name("imds_relay.py")
IDLE_SECONDS = 15
MAX_BODY = 64 * 1024
MAX_TOKENS = 1000
MAX_LOG = 10000
VERSIONS = ("1.0", "2009-04-04", "2016-09-02", "2018-09-24", "2021-03-23", "latest")


@dataclass(frozen=True)
class Instance:
    """What the metadata says about the instance: fixed, EC2-shaped values."""
    architecture: str = "x86_64"
    instance_type: str = "t3.micro"
    instance_id: str = "i-0a1f0e2c3b4d5e6f7"
    image_id: str = "ami-0a1f0e2c3b4d5e6f7"
    region: str = "us-east-1"
    zone: str = "us-east-1a"
    key_name: str = "amiforge"
    ssh_key: str | None = None        # public-keys/0/openssh-key
    user_data: bytes | None = None
    # the mapping's other volumes: (metadata name, device), e.g. ("ebs1", "sdf")
    block_devices: tuple[tuple[str, str], ...] = ()

    @property
    def local_hostname(self) -> str:
        return f"ip-{GUEST_ADDRESS.replace('.', '-')}.ec2.internal"


def metadata(instance: Instance) -> dict[str, Any]:
    """The tree under /VERSION/: dicts are directories, strings files."""
    hostname = instance.local_hostname
    mappings = {"ami": "/dev/xvda", "root": "/dev/xvda"}
    mappings |= dict(instance.block_devices)
    interface = {"device-number": "0", "interface-id": "eni-0a1f0e2c3b4d5e6f7",
                 "local-hostname": hostname, "local-ipv4s": GUEST_ADDRESS, "mac": GUEST_MAC,
                 "subnet-id": "subnet-0a1f0e2c", "subnet-ipv4-cidr-block": GUEST_NETWORK,
                 "vpc-id": "vpc-0a1f0e2c", "vpc-ipv4-cidr-block": GUEST_NETWORK}
    meta = {
        "ami-id": instance.image_id, "ami-launch-index": "0", "ami-manifest-path": "(unknown)",
        "block-device-mapping": mappings, "hostname": hostname,
        "instance-id": instance.instance_id, "instance-type": instance.instance_type,
        "local-hostname": hostname, "local-ipv4": GUEST_ADDRESS, "mac": GUEST_MAC,
        "network": {"interfaces": {"macs": {GUEST_MAC: interface}}},
        "placement": {"availability-zone": instance.zone, "region": instance.region},
        "reservation-id": "r-0a1f0e2c3b4d5e6f7", "security-groups": "default",
        "services": {"domain": "amazonaws.com", "partition": "aws"},
    }
    if instance.ssh_key:
        meta["public-keys"] = {f"0={instance.key_name}": {"openssh-key": instance.ssh_key}}
    document = {"accountId": "123456789012", "architecture": instance.architecture,
                "availabilityZone": instance.zone, "imageId": instance.image_id,
                "instanceId": instance.instance_id, "instanceType": instance.instance_type,
                "privateIp": GUEST_ADDRESS, "region": instance.region, "version": "2017-09-30"}
    tree: dict[str, Any] = {"meta-data": meta, "dynamic": {"instance-identity": {
        "document": json.dumps(document, indent=2)}}}
    if instance.user_data is not None:
        tree["user-data"] = instance.user_data
    return tree


def lookup(tree: dict[str, Any], path: str) -> str | bytes | None:
    """A file's contents, a directory's listing, or None. ``public-keys/0/`` finds the
    entry listed as ``0=NAME``."""
    node: Any = tree
    for part in [p for p in path.split("/") if p]:
        if not isinstance(node, dict):
            return None
        node = node.get(part, next((v for k, v in node.items() if k.split("=")[0] == part
                                    and "=" in k), None))
        if node is None:
            return None
    if isinstance(node, dict):
        return "\n".join(k if not isinstance(v, dict) or "=" in k else f"{k}/"
                         for k, v in node.items())
    return node


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    token: str  # "valid", "missing", "invalid" (GETs); "-" for the token PUT


@dataclass
class MetadataService:
    instance: Instance
    requests: list[Request] = field(default_factory=list)  # the first MAX_LOG
    unrecorded: int = 0                                     # and how many came after
    _tokens: dict[str, float] = field(default_factory=dict)
    _server: QuietServer | None = None
    _serving: threading.Thread | None = None
    _slots: tempfile.TemporaryDirectory[str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> MetadataService:
        self._slots = tempfile.TemporaryDirectory(prefix="amiforge-imds-")
        self._server = QuietServer(("127.0.0.1", 0), _handler(self))
        self._serving = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._serving.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._server is not None:
            if self._serving is not None and self._serving.is_alive():
                self._server.shutdown()  # (waits for serve_forever: only if it runs)
            self._server.server_close()
            self._server = None
        if self._slots is not None:
            self._slots.cleanup()
            self._slots = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def relay_command(self) -> str:
        """The guestfwd command (QEMU splits it as a shell would, and runs it without one):
        this interpreter, isolated, relaying one connection to the service."""
        assert self._slots is not None
        return shlex.join([sys.executable, "-I", "-S", str(RELAY), str(self.port),
                           self._slots.name])

    def answer(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes,
                                                                           dict[str, str]]:
        if method == "PUT":
            status, body, extra = self._token(path, headers)
            token_state = "-"
        else:
            token_state = self._token_state(headers.get(TOKEN_HEADER.lower()))
            status, body, extra = self._get(path, token_state)
        self.record(Request(method, path[:200], status, token_state))
        return status, body, extra

    def record(self, request: Request) -> None:
        with self._lock:
            if len(self.requests) < MAX_LOG:
                self.requests.append(request)
            else:
                self.unrecorded += 1

    def _token(self, path: str, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        if path != TOKEN_PATH:
            return 404, b"Not Found", {}
        if "x-forwarded-for" in headers:
            return 403, b"Forbidden", {}
        ttl = plain_number(headers.get(TOKEN_TTL_HEADER.lower()))
        if ttl is None or not 1 <= ttl <= MAX_TOKEN_TTL:
            return 400, b"Bad Request", {}
        token, now = secrets.token_urlsafe(42), time.monotonic()
        with self._lock:
            for old in [t for t, expires in self._tokens.items() if expires <= now]:
                del self._tokens[old]
            while len(self._tokens) >= MAX_TOKENS:  # the oldest goes first
                del self._tokens[next(iter(self._tokens))]
            self._tokens[token] = now + ttl
        return 200, token.encode(), {TOKEN_TTL_HEADER: str(ttl)}

    def _token_state(self, token: str | None) -> str:
        if not token:
            return "missing"
        with self._lock:
            expires = self._tokens.get(token)
        return "valid" if expires is not None and time.monotonic() < expires else "invalid"

    def _get(self, path: str, token_state: str) -> tuple[int, bytes, dict[str, str]]:
        if token_state != "valid":
            return 401, b"Unauthorized", {}
        parts = path.split("?")[0].strip("/").split("/", 1)
        if parts == [""]:
            return 200, "\n".join(VERSIONS).encode(), {}
        if parts[0] not in VERSIONS:
            return 404, b"Not Found", {}
        found = lookup(metadata(self.instance), parts[1] if len(parts) > 1 else "")
        if found is None:
            return 404, b"Not Found", {}
        return 200, found if isinstance(found, bytes) else found.encode(), {}


def plain_number(text: str | None) -> int | None:
    """A header's non-negative integer, ASCII digits only (``str.isdigit`` takes "²"), at
    most five of them; None for anything else."""
    if text is None or not re.fullmatch(r"[0-9]{1,5}", text):
        return None
    return int(text)


def _handler(service: MetadataService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = IDLE_SECONDS
        protocol_version = "HTTP/1.1"
        server_version = "EC2ws"
        sys_version = ""

        def _serve(self) -> None:
            length = plain_number(self.headers.get("Content-Length", "0"))
            if length is None or length > MAX_BODY or "Transfer-Encoding" in self.headers:
                # no body is skipped by guesswork: answered, and the connection closed
                service.record(Request(self.command, self.path[:200], 400, "-"))
                self.close_connection = True
                self._reply(400, b"Bad Request", {"Connection": "close"})
                return
            self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._reply(*service.answer(self.command, self.path, headers))

        def _reply(self, status: int, body: bytes, extra: dict[str, str]) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = _serve  # (other methods: http.server's 501)

        def log_message(self, format: str, *args: Any) -> None:  # recorded, not printed
            pass

    return Handler


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a guest's broken connection is its own business: nothing is printed

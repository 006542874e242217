"""The EC2-like boots' metadata service keeps AWS's IMDSv2 rules (each cited in
builder/imds.py), serves the tree cloud-init's EC2 datasource reads, and is reached through
the relay QEMU runs per guest connection."""

from __future__ import annotations

import http.client
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.imds import (
    GUEST_ADDRESS,
    TOKEN_HEADER,
    TOKEN_TTL_HEADER,
    Instance,
    MetadataService,
)
from builder.imds_relay import MAX_RELAYS

pytestmark = pytest.mark.unit
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHtC4dBn0dR0aGzDlqbEO4Ckh0G1xKXb4uN7mA4rFqUe t@x"


@pytest.fixture
def imds():
    instance = Instance(ssh_key=KEY, user_data=b"#!/bin/sh\necho hi\n",
                        block_devices=(("ebs1", "sdf"), ("ephemeral0", "sdb")))
    with MetadataService(instance) as service:
        yield service


def call(service: MetadataService, method: str, path: str,
         headers: dict[str, str] | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    connection.request(method, path, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read().decode()


def token(service: MetadataService, ttl: str = "60") -> str:
    status, body = call(service, "PUT", "/latest/api/token", {TOKEN_TTL_HEADER: ttl})
    assert status == 200
    return body


def get(service: MetadataService, path: str) -> tuple[int, str]:
    return call(service, "GET", path, {TOKEN_HEADER: token(service)})


def test_a_token_is_required_and_must_be_one_the_service_gave(imds) -> None:
    assert call(imds, "GET", "/latest/meta-data/instance-id")[0] == 401
    assert call(imds, "GET", "/latest/meta-data/instance-id", {TOKEN_HEADER: "made-up"})[0] \
        == 401
    assert get(imds, "/latest/meta-data/instance-id") == (200, "i-0a1f0e2c3b4d5e6f7")
    states = [(r.method, r.status, r.token) for r in imds.requests]
    assert states[:2] == [("GET", 401, "missing"), ("GET", 401, "invalid")]
    assert states[2:] == [("PUT", 200, "-"), ("GET", 200, "valid")]


@pytest.mark.parametrize("headers", [{}, {TOKEN_TTL_HEADER: "0"}, {TOKEN_TTL_HEADER: "21601"},
                                     {TOKEN_TTL_HEADER: "ten"}])
def test_a_token_needs_a_ttl_of_1_to_21600_seconds(imds, headers: dict[str, str]) -> None:
    assert call(imds, "PUT", "/latest/api/token", headers)[0] == 400


def test_a_token_is_not_handed_through_a_proxy(imds) -> None:
    headers = {TOKEN_TTL_HEADER: "60", "X-Forwarded-For": "10.0.0.1"}
    assert call(imds, "PUT", "/latest/api/token", headers)[0] == 403


def test_an_expired_token_is_refused(imds, monkeypatch: pytest.MonkeyPatch) -> None:
    given = token(imds, ttl="1")
    monkeypatch.setattr("builder.imds.time.monotonic", lambda: 10.0**9)
    assert call(imds, "GET", "/latest/meta-data/", {TOKEN_HEADER: given})[0] == 401


def test_the_tree_cloud_init_reads(imds) -> None:
    assert "2021-03-23" in get(imds, "/")[1].split()
    listing = get(imds, "/2021-03-23/meta-data/")[1].splitlines()
    assert {"instance-id", "local-hostname", "placement/", "public-keys/"} <= set(listing)
    assert get(imds, "/latest/meta-data/public-keys/")[1] == "0=amiforge"
    assert get(imds, "/latest/meta-data/public-keys/0/") == (200, "openssh-key")
    assert get(imds, "/latest/meta-data/public-keys/0/openssh-key") == (200, KEY)
    assert get(imds, "/latest/meta-data/placement/region") == (200, "us-east-1")
    assert get(imds, "/latest/meta-data/local-hostname")[1] == \
        f"ip-{GUEST_ADDRESS.replace('.', '-')}.ec2.internal"
    assert get(imds, "/latest/meta-data/block-device-mapping/ebs1") == (200, "sdf")
    assert get(imds, "/latest/meta-data/block-device-mapping/ephemeral0") == (200, "sdb")
    assert get(imds, "/latest/user-data") == (200, "#!/bin/sh\necho hi\n")
    document = json.loads(get(imds, "/latest/dynamic/instance-identity/document")[1])
    assert document["region"] == "us-east-1" and document["instanceId"].startswith("i-")
    assert get(imds, "/latest/meta-data/nothing-here")[0] == 404
    assert get(imds, "/1999-01-01/meta-data/")[0] == 404


def test_without_user_data_or_a_key_those_are_not_there() -> None:
    with MetadataService(Instance()) as bare:
        assert get(bare, "/latest/user-data")[0] == 404
        assert "public-keys/" not in get(bare, "/latest/meta-data/")[1]


def test_the_relay_carries_a_guest_connection_to_the_service(imds) -> None:
    """What QEMU's guestfwd does: the command's stdin and stdout are the connection."""
    request = (f"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
               f"{TOKEN_TTL_HEADER}: 30\r\nConnection: close\r\n\r\n").encode()
    reply = subprocess.run(shlex.split(imds.relay_command()), input=request,
                           capture_output=True, timeout=30, check=True).stdout
    assert reply.startswith(b"HTTP/1.1 200") and f"{TOKEN_TTL_HEADER}: 30".encode() in reply
    assert imds.relay_command().startswith(sys.executable)


def test_a_guest_gets_at_most_max_relays_connections_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile guest opening connections without end gets MAX_RELAYS relays; the rest
    are closed at once, and an idle one goes after IDLE_SECONDS."""
    monkeypatch.setattr("builder.imds.IDLE_SECONDS", 3)
    with MetadataService(Instance()) as imds:
        relays_are_bounded(imds)


def relays_are_bounded(imds: MetadataService) -> None:
    argv = shlex.split(imds.relay_command())
    held = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            for _ in range(MAX_RELAYS)]
    try:
        slots = Path(shlex.split(imds.relay_command())[-1])
        deadline = time.monotonic() + 20
        while len(list(slots.iterdir())) < MAX_RELAYS and time.monotonic() < deadline:
            time.sleep(0.1)  # each takes its slot (a lock file), then connects
        time.sleep(0.5)
        began = time.monotonic()
        extra = subprocess.run(argv, input=b"GET / HTTP/1.1\r\n\r\n", capture_output=True,
                               timeout=30)
        assert extra.stdout == b"" and time.monotonic() - began < 5
        assert all(p.poll() is None for p in held)
        # the service closes the idle ones: their relays end by themselves
        for proc in held:
            proc.wait(timeout=3 + 10)
    finally:
        for proc in held:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("raw", [
    b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 70000\r\n\r\n" + b"a" * 70000
    + b"GET /smuggled HTTP/1.1\r\n\r\n",
    b"PUT /latest/api/token HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "PUT /latest/api/token HTTP/1.1\r\nConnection: close\r\n"
    "X-aws-ec2-metadata-token-ttl-seconds: \u00b2\r\n\r\n".encode(),
    b"PUT /latest/api/token HTTP/1.1\r\nConnection: close\r\n"
    b"X-aws-ec2-metadata-token-ttl-seconds: " + b"9" * 5000 + b"\r\n\r\n",
])
def test_a_hostile_request_gets_400_and_nothing_else(imds, raw: bytes, capfd) -> None:
    """What the review sent: an unbounded read, tracebacks, a request smuggled in a body."""
    import socket

    with socket.create_connection(("127.0.0.1", imds.port), timeout=10) as sock:
        sock.sendall(raw)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and reply.count(b"HTTP/1.1") == 1
    assert [r.path for r in imds.requests] == ["/latest/api/token"]
    assert "Traceback" not in capfd.readouterr().err


def test_tokens_and_the_log_are_bounded(imds, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("builder.imds.MAX_TOKENS", 3)
    monkeypatch.setattr("builder.imds.MAX_LOG", 5)
    given = [token(imds) for _ in range(6)]
    assert call(imds, "GET", "/latest/", {TOKEN_HEADER: given[0]})[0] == 401  # pushed out
    assert call(imds, "GET", "/latest/", {TOKEN_HEADER: given[-1]})[0] == 200
    assert len(imds.requests) == 5 and imds.unrecorded == 3

"""The state of the archive a build reads: for each suite, its package indexes' sha256 and
its date, from the suite's signed Release.

Security updates land under the same suite names (trixie-security), so a plan alone cannot
tell a current bootstrap from a stale one. The bootstrap's cache key holds the sha256 of
each suite's Packages index for the plan's components and architecture, read from the
InRelease text gpgv verified against the archive keyring (as apt would): the key moves when
a package does, not when the suite's Release is only re-signed (-updates and -security are
re-signed weekly for Valid-Until)."""

from __future__ import annotations

import base64
import datetime
import email.utils
import http.client
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from builder.errors import BuildFailed, ToolFailed
from builder.host import treepath
from builder.host.fsutil import read_regular_file
from builder.host.run import run
from builder.plan import OSPlan

TIMEOUT = 30     # per socket operation
DEADLINE = 120   # for the whole file
MAX_RELEASE = 8 << 20  # an InRelease file is well under 1 MiB


def archive_state(os_plan: OSPlan, keyring: Path | None = None) -> list[dict[str, object]]:
    """[{uri, suite, date, indexes: {path: sha256}}] for each apt source of the plan."""
    keyring = keyring or Path(f"/usr/share/keyrings/{os_plan.distribution}-archive-keyring.gpg")
    wanted = index_paths(os_plan)
    out: list[dict[str, object]] = []
    for uri, suite in os_plan.sources:
        release = signed_release(uri, suite, os_plan.apt_auth, keyring)
        out.append({"uri": uri, "suite": suite, "date": field(release, "Date"),
                    "indexes": package_indexes(release, wanted)})
    return out


def index_paths(os_plan: OSPlan) -> list[str]:
    """The Packages indexes a bootstrap reads: one per component, for the architecture."""
    return [f"{c}/binary-{os_plan.architecture}/Packages" for c in os_plan.components]


def cache_relevant(state: list[dict[str, object]] | None) -> list[dict[str, object]] | None:
    """What of the archive's state a bootstrap depends on: the indexes, not the dates."""
    if state is None:
        return None
    return [{k: v for k, v in suite.items() if k != "date"} for suite in state]


def tree_matches(tree: Path, os_plan: OSPlan, state: list[dict[str, object]]) -> bool:
    """The package indexes apt used in ``tree`` (its lists, verified by apt) are those
    the key was made from: a mirror that changed between amiforge's look and apt's, or
    that answers apt differently, must not store older packages under a newer key."""
    wanted = index_paths(os_plan)
    for suite in state:
        name = re.sub(r"^[a-z+]+://", "", f"{suite['uri']}".rstrip("/")).replace("/", "_")
        try:
            text = treepath.read_text(tree, f"/var/lib/apt/lists/{name}_dists_"
                                            f"{suite['suite']}_InRelease")
        except BuildFailed:
            return False
        if package_indexes(text, wanted) != suite["indexes"]:
            return False
    return True


def signed_release(uri: str, suite: str, auth: str | None, keyring: Path) -> str:
    """The text of ``dists/SUITE/InRelease`` that a valid archive key signed (nothing else),
    refused when it is for another suite or past its Valid-Until: an old, genuinely signed
    Release replayed by whoever sits between amiforge and a plain-http mirror would
    otherwise point the key at a stale bootstrap, where apt (which checks both) never runs."""
    url = f"{uri.rstrip('/')}/dists/{suite}/InRelease"
    signed = _fetch(url, auth)
    with tempfile.TemporaryDirectory(prefix="amiforge-release-") as folder:
        inrelease, text = Path(folder) / "InRelease", Path(folder) / "Release"
        inrelease.write_bytes(signed)
        try:
            status = run(["gpgv", "--quiet", "--status-fd", "1", "--keyring", keyring,
                          "--output", text, "--", inrelease], capture=True)
        except ToolFailed:
            raise BuildFailed(f"{url}: not signed by a key of {keyring}") from None
        if "[GNUPG:] VALIDSIG" not in status or re.search(r"\[GNUPG:\] (EXP|REV)KEYSIG",
                                                          status):
            raise BuildFailed(f"{url}: not signed by a valid key of {keyring}")
        release = text.read_text(errors="replace")
    if suite not in (field(release, "Suite"), field(release, "Codename")):
        raise BuildFailed(f"{url}: the Release of another suite "
                          f"({field(release, 'Codename') or field(release, 'Suite')!r})")
    _check_valid_until(url, field(release, "Valid-Until"))
    return release


def _check_valid_until(url: str, valid_until: str) -> None:
    if not valid_until:
        return
    try:
        until = email.utils.parsedate_to_datetime(valid_until)
    except (TypeError, ValueError):
        raise BuildFailed(f"{url}: Valid-Until is not a date") from None
    if until < datetime.datetime.now(datetime.UTC):
        raise BuildFailed(f"{url}: expired (Valid-Until {valid_until}): the mirror serves an "
                          "old Release")


def field(release: str, name: str) -> str:
    match = re.search(rf"^{name}: (.+)$", release, re.M)
    return match.group(1).strip() if match else ""


def package_indexes(release: str, wanted: list[str]) -> dict[str, str]:
    """sha256 of each wanted Packages index (uncompressed, else .xz), from the SHA256 list."""
    listed = re.search(r"^SHA256:\n((?: .*\n?)*)", release, re.M)
    sums = {}
    for line in (listed.group(1) if listed else "").splitlines():
        parts = line.split()
        if len(parts) == 3:
            sums[parts[2]] = parts[0]
    return {path: sums.get(path) or sums.get(f"{path}.xz") or "" for path in wanted}


class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Redirects within the mirror only: another scheme, host or port would take the
    mirror's Authorization header with it (urllib copies it) or reach another service."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise urllib.error.HTTPError(req.full_url, code, "redirected to another origin",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, auth: str | None) -> bytes:
    """The file at ``url``: file:// through the regular-file reader (no FIFO, no device,
    no folder), http(s) with redirects kept to the mirror and one deadline for the whole
    read (a server sending a byte at a time cannot hold the build)."""
    if url.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        try:
            return read_regular_file(path, MAX_RELEASE, url, BuildFailed)
        except BuildFailed:
            raise BuildFailed(f"cannot read {url}") from None
    opener = urllib.request.build_opener(_SameOrigin)
    request = urllib.request.Request(url, headers=_authorization(url, auth))
    deadline = time.monotonic() + DEADLINE
    data = bytearray()
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            while chunk := response.read(1 << 16):
                data += chunk
                if len(data) > MAX_RELEASE:
                    raise BuildFailed(f"{url}: larger than {MAX_RELEASE >> 20} MiB")
                if time.monotonic() > deadline:
                    raise BuildFailed(f"{url}: not read within {DEADLINE} s")
    except urllib.error.HTTPError as exc:
        raise BuildFailed(f"cannot read {url} (HTTP {exc.code}): the archive's state decides "
                          "whether a cached bootstrap is current") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        raise BuildFailed(f"cannot read {url}: the archive's state decides whether a cached "
                          "bootstrap is current") from None
    return bytes(data)


def _authorization(url: str, auth: str | None) -> dict[str, str]:
    """Basic auth for ``url`` from the plan's auth.conf entries, matched as apt matches
    them (apt_auth.conf(5)): the same scheme (https when the entry names none), the same
    host and port, and a path that is the entry's or below it."""
    target = urllib.parse.urlsplit(url)
    for line in (auth or "").splitlines():
        fields = line.split()
        if len(fields) != 6 or fields[0] != "machine":
            continue
        machine = fields[1] if "://" in fields[1] else f"https://{fields[1]}"
        entry = urllib.parse.urlsplit(machine)
        path = entry.path.rstrip("/")
        if (entry.scheme, entry.netloc) == (target.scheme, target.netloc) and \
                (target.path == path or target.path.startswith(path + "/")):
            token = base64.b64encode(f"{fields[3]}:{fields[5]}".encode()).decode()
            return {"Authorization": f"Basic {token}"}
    return {}

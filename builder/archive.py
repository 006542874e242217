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
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from builder.errors import BuildFailed, ToolFailed
from builder.host.run import run
from builder.plan import OSPlan

TIMEOUT = 30
MAX_RELEASE = 8 << 20  # an InRelease file is well under 1 MiB


def archive_state(os_plan: OSPlan, keyring: Path | None = None) -> list[dict[str, object]]:
    """[{uri, suite, date, indexes: {path: sha256}}] for each apt source of the plan."""
    keyring = keyring or Path(f"/usr/share/keyrings/{os_plan.distribution}-archive-keyring.gpg")
    wanted = [f"{c}/binary-{os_plan.architecture}/Packages" for c in os_plan.components]
    out: list[dict[str, object]] = []
    for uri, suite in os_plan.sources:
        release = signed_release(uri, suite, os_plan.apt_auth, keyring)
        out.append({"uri": uri, "suite": suite, "date": field(release, "Date"),
                    "indexes": package_indexes(release, wanted)})
    return out


def cache_relevant(state: list[dict[str, object]] | None) -> list[dict[str, object]] | None:
    """What of the archive's state a bootstrap depends on: the indexes, not the dates."""
    if state is None:
        return None
    return [{k: v for k, v in suite.items() if k != "date"} for suite in state]


def signed_release(uri: str, suite: str, auth: str | None, keyring: Path) -> str:
    """The text of ``dists/SUITE/InRelease`` that the archive key signed (nothing else)."""
    url = f"{uri.rstrip('/')}/dists/{suite}/InRelease"
    signed = _fetch(url, auth)
    with tempfile.TemporaryDirectory(prefix="amiforge-release-") as folder:
        inrelease, text = Path(folder) / "InRelease", Path(folder) / "Release"
        inrelease.write_bytes(signed)
        try:
            run(["gpgv", "--quiet", "--keyring", keyring, "--output", text, "--", inrelease])
        except ToolFailed:
            raise BuildFailed(f"{url}: not signed by a key of {keyring}") from None
        return text.read_text(errors="replace")


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


def _fetch(url: str, auth: str | None) -> bytes:
    request = urllib.request.Request(url, headers=_authorization(url, auth))
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            data: bytes = response.read(MAX_RELEASE + 1)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BuildFailed(f"cannot read {url} ({reason}): the archive's state decides "
                          "whether a cached bootstrap is current") from None
    if len(data) > MAX_RELEASE:
        raise BuildFailed(f"{url}: larger than {MAX_RELEASE >> 20} MiB")
    return data


def _authorization(url: str, auth: str | None) -> dict[str, str]:
    """Basic auth for ``url`` from the plan's auth.conf entries (machine host/path)."""
    bare = re.sub(r"^[a-z]+://", "", url)
    for line in (auth or "").splitlines():
        fields = line.split()
        if len(fields) == 6 and bare.startswith(fields[1]):
            token = base64.b64encode(f"{fields[3]}:{fields[5]}".encode()).decode()
            return {"Authorization": f"Basic {token}"}
    return {}

"""The state of the archive a build reads: each suite's signed Release date.

Security updates land under the same suite names (trixie-security), so a plan alone cannot
tell a current bootstrap from a stale one. The bootstrap's cache key holds the Date of each
suite's InRelease file, read from the signed text only (gpgv against the archive keyring,
as apt would), so a rebuild after an update makes the bootstrap again."""

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


def suite_dates(os_plan: OSPlan) -> list[dict[str, str]]:
    """[{uri, suite, date}] for each apt source of the plan."""
    keyring = Path(f"/usr/share/keyrings/{os_plan.distribution}-archive-keyring.gpg")
    return [{"uri": uri, "suite": suite,
             "date": release_date(uri, suite, os_plan.apt_auth, keyring)}
            for uri, suite in os_plan.sources]


def release_date(uri: str, suite: str, auth: str | None, keyring: Path) -> str:
    url = f"{uri.rstrip('/')}/dists/{suite}/InRelease"
    signed = _fetch(url, auth)
    with tempfile.TemporaryDirectory(prefix="amiforge-release-") as folder:
        inrelease, text = Path(folder) / "InRelease", Path(folder) / "Release"
        inrelease.write_bytes(signed)
        try:
            run(["gpgv", "--quiet", "--keyring", keyring, "--output", text, "--", inrelease])
        except ToolFailed:
            raise BuildFailed(f"{url}: not signed by a key of {keyring}") from None
        match = re.search(r"^Date: (.+)$", text.read_text(errors="replace"), re.M)
    if match is None:
        raise BuildFailed(f"{url}: no Date field")
    return match.group(1).strip()


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

"""Mirror credentials (``http://user:token@host/debian``) are for apt during the build only.

The image's apt sources, the plan, cache keys and ``-v`` logs get the URL without them;
apt reads them from an ``auth.conf.d`` file (apt_auth.conf(5)) that exists only while
amiforge runs apt (mmdebstrap's setup, package installs, recipe scripts) and is removed
before the tree is cached or imaged."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

from builder.errors import InputError

AUTH_FILE = "/etc/apt/auth.conf.d/90-amiforge-build.conf"
_USERINFO = re.compile(r"(?<=://)[^/@]+@")


def split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without user and password, the auth.conf entry for them or None)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # the message would quote the URL, credentials and all
        raise InputError("os.mirror: not a valid URL (host or port)") from None
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    public = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    login, password = unquote(parts.username or ""), unquote(parts.password or "")
    if re.search(r"[\s\x00-\x1f\x7f]", login + password):
        raise InputError("os.mirror: the mirror's user name and password may not hold white "
                         "space or control characters")
    if not login or not password:
        raise InputError("os.mirror: give the mirror's user name and password both "
                         "(user:password@host)")
    # apt_auth.conf(5): an entry without a scheme matches https only
    machine = f"{netloc}{parts.path}" if parts.scheme == "https" else \
        f"{parts.scheme}://{netloc}{parts.path}"
    return public, f"machine {machine} login {login} password {password}\n"


def redact(text: str) -> str:
    """``scheme://user:secret@host`` as ``scheme://***@host`` (for logs)."""
    return _USERINFO.sub("***@", text)

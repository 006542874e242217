"""The archive's state in the bootstrap's cache key: each suite's Date, read from the
signed InRelease text only."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from builder.archive import _authorization, release_date
from builder.errors import BuildFailed

RELEASE = "Origin: Debian\nSuite: stable-security\nDate: Sat, 28 Nov 2026 10:11:12 UTC\n"


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway signing key: (GNUPGHOME, its public keyring)."""
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--quiet", "--pinentry-mode", "loopback",
           "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", "archive@example.org", "ed25519", "sign",
                    "never"], check=True, capture_output=True)
    keyring = home / "archive-keyring.gpg"
    keyring.write_bytes(subprocess.run([*gpg, "--export"], check=True,
                                       capture_output=True).stdout)
    return home, keyring


def mirror(root: Path, suite: str, inrelease: bytes) -> str:
    folder = root / "dists" / suite
    folder.mkdir(parents=True)
    (folder / "InRelease").write_bytes(inrelease)
    return f"file://{root}"


def clearsign(home: Path, text: str) -> bytes:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--quiet",
                           "--clearsign"], input=text.encode(), check=True,
                          capture_output=True).stdout


def test_the_date_comes_from_the_signed_release(signer, tmp_path: Path) -> None:
    home, keyring = signer
    uri = mirror(tmp_path, "trixie-security", clearsign(home, RELEASE))
    assert release_date(uri, "trixie-security", None, keyring) == \
        "Sat, 28 Nov 2026 10:11:12 UTC"


def test_text_outside_the_signature_is_not_read(signer, tmp_path: Path) -> None:
    """A Date put before the signed block (or a changed signed text) is refused: the key
    must not be steerable by whoever sits between amiforge and the mirror."""
    home, keyring = signer
    signed = clearsign(home, RELEASE)
    forged = signed.replace(b"Sat, 28 Nov 2026", b"Sun, 29 Nov 2026")
    uri = mirror(tmp_path / "a", "trixie", forged)
    with pytest.raises(BuildFailed, match="not signed by a key of"):
        release_date(uri, "trixie", None, keyring)
    unsigned = mirror(tmp_path / "b", "trixie", RELEASE.encode())
    with pytest.raises(BuildFailed, match="not signed by a key of"):
        release_date(unsigned, "trixie", None, keyring)


def test_an_unreachable_archive_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BuildFailed, match=r"cannot read file://.*/dists/trixie/InRelease"):
        release_date(f"file://{tmp_path}", "trixie", None, tmp_path / "keyring.gpg")


def test_mirror_credentials_go_to_their_mirror_only() -> None:
    auth = "machine apt.example.com:8443/debian login ci password t0k\n"
    header = _authorization("https://apt.example.com:8443/debian/dists/x/InRelease", auth)
    assert header == {"Authorization": "Basic Y2k6dDBr"}
    assert _authorization("http://security.debian.org/debian-security/dists/x/InRelease",
                          auth) == {}

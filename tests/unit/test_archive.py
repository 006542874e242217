"""The archive's state in the bootstrap's cache key: each suite's package index sha256,
read from the signed InRelease text only."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from builder.archive import _authorization, archive_state, cache_relevant, signed_release
from builder.errors import BuildFailed
from builder.plan import make_plan
from builder.recipe.load import LoadOptions, load_recipe

INDEX = "58ee552dac500e9da873692010d6b292698e45ea4883f9a47c60df177da1d9b0"


def release(suite: str, date: str = "Sat, 28 Nov 2026 10:11:12 UTC", index: str = INDEX,
            valid_until: str = "Sat, 05 Dec 2099 10:11:12 UTC") -> str:
    return (f"Origin: Debian\nSuite: {suite}\nDate: {date}\nValid-Until: {valid_until}\n"
            "SHA256:\n"
            f" {'0' * 64}  311044 main/binary-amd64/Packages.xz\n"
            f" {index}  2259602 main/binary-amd64/Packages\n"
            f" {'1' * 64}  2259602 main/binary-arm64/Packages\n")


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


def clearsign(home: Path, text: str) -> bytes:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--quiet",
                           "--clearsign"], input=text.encode(), check=True,
                          capture_output=True).stdout


def publish(root: Path, suite: str, inrelease: bytes) -> str:
    folder = root / "dists" / suite
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "InRelease").write_bytes(inrelease)
    return f"file://{root}"


def os_plan(tmp_path: Path, mirror: str):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: archive-test\nos: {{mirror: \"{mirror}\", "
                      f"security_mirror: \"{mirror}\"}}\n")
    return make_plan(load_recipe(recipe, LoadOptions(allow_host_paths=True))).os


def test_the_key_holds_the_signed_package_indexes(signer, tmp_path: Path) -> None:
    home, keyring = signer
    mirror = tmp_path / "mirror"
    for suite in ("trixie", "trixie-updates", "trixie-security"):
        uri = publish(mirror, suite, clearsign(home, release(suite)))
    state = archive_state(os_plan(tmp_path, uri), keyring)
    assert [s["suite"] for s in state] == ["trixie", "trixie-updates", "trixie-security"]
    assert state[2]["indexes"] == {"main/binary-amd64/Packages": INDEX}
    assert state[2]["date"] == "Sat, 28 Nov 2026 10:11:12 UTC"

    # re-signed for Valid-Until, same packages: the same key
    publish(mirror, "trixie-security", clearsign(home, release(
        "trixie-security", date="Mon, 30 Nov 2026 00:00:00 UTC")))
    resigned = archive_state(os_plan(tmp_path, uri), keyring)
    assert cache_relevant(resigned) == cache_relevant(state)
    # a security update: another index, another key
    publish(mirror, "trixie-security", clearsign(home, release("trixie-security",
                                                               index="2" * 64)))
    updated = archive_state(os_plan(tmp_path, uri), keyring)
    assert cache_relevant(updated) != cache_relevant(state)


def test_text_outside_the_signature_is_not_read(signer, tmp_path: Path) -> None:
    """A changed signed text, or a Release without a signature, is refused: the key must
    not be steerable by whoever sits between amiforge and the mirror."""
    home, keyring = signer
    forged = clearsign(home, release("trixie")).replace(INDEX.encode(), b"3" * 64)
    uri = publish(tmp_path / "a", "trixie", forged)
    with pytest.raises(BuildFailed, match="not signed by a key of"):
        signed_release(uri, "trixie", None, keyring)
    unsigned = publish(tmp_path / "b", "trixie", release("trixie").encode())
    with pytest.raises(BuildFailed, match="not signed by a key of"):
        signed_release(unsigned, "trixie", None, keyring)


def test_an_unreachable_archive_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BuildFailed, match=r"cannot read file://.*/dists/trixie/InRelease"):
        signed_release(f"file://{tmp_path}", "trixie", None, tmp_path / "keyring.gpg")


def test_mirror_credentials_go_to_their_mirror_only() -> None:
    """Matched as apt matches auth.conf: scheme (https without one), host, port, path."""
    auth = "machine apt.example.com:8443/debian login ci password t0k\n"
    header = _authorization("https://apt.example.com:8443/debian/dists/x/InRelease", auth)
    assert header == {"Authorization": "Basic Y2k6dDBr"}
    for elsewhere in ("http://security.debian.org/debian-security/dists/x/InRelease",
                      "https://apt.example.com:8443.evil.example/debian/dists/x/InRelease",
                      "https://apt.example.com:8443/debian-evil/dists/x/InRelease",
                      "http://apt.example.com:8443/debian/dists/x/InRelease",
                      "https://apt.example.com/debian/dists/x/InRelease"):
        assert _authorization(elsewhere, auth) == {}, elsewhere
    plain = "machine http://mirror.corp/debian login ci password t0k\n"
    assert _authorization("http://mirror.corp/debian/dists/x/InRelease", plain)
    assert not _authorization("http://mirror.corp.evil.com/debian/dists/x/InRelease", plain)


def test_an_old_or_foreign_release_is_refused(signer, tmp_path: Path) -> None:
    """Genuinely signed, but past its Valid-Until, or another suite's: replayed by whoever
    sits between amiforge and a plain-http mirror, either would steer the key to a stale
    bootstrap."""
    home, keyring = signer
    old = publish(tmp_path / "a", "trixie-security", clearsign(home, release(
        "trixie-security", valid_until="Sat, 05 Dec 2020 10:11:12 UTC")))
    with pytest.raises(BuildFailed, match="expired"):
        signed_release(old, "trixie-security", None, keyring)
    other = publish(tmp_path / "b", "trixie-security", clearsign(home, release("trixie")))
    with pytest.raises(BuildFailed, match="another suite"):
        signed_release(other, "trixie-security", None, keyring)


def test_redirects_stay_with_the_mirror() -> None:
    import http.server
    import threading

    class Redirect(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.2:9/elsewhere")
            self.end_headers()

    server = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(BuildFailed, match=r"HTTP 302"):
            signed_release(f"http://127.0.0.1:{server.server_address[1]}/debian", "trixie",
                           "machine http://127.0.0.1/debian login a password b\n",
                           Path("/nonexistent"))
    finally:
        server.shutdown()


def test_a_file_mirror_needs_allow_host_paths(tmp_path: Path) -> None:
    from builder.errors import RecipeError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: archive-test\nos: {mirror: \"file:///srv/mirror\"}\n")
    with pytest.raises(RecipeError, match="--allow-host-paths"):
        load_recipe(recipe)
    assert load_recipe(recipe, LoadOptions(allow_host_paths=True))


def test_the_security_suite_comes_from_the_security_archive(tmp_path: Path) -> None:
    plan = os_plan(tmp_path, "http://mirror.example/debian")
    plan = dataclasses.replace(plan, security_mirror="http://security.example/ds")
    assert plan.sources == (("http://mirror.example/debian", "trixie"),
                            ("http://mirror.example/debian", "trixie-updates"),
                            ("http://security.example/ds", "trixie-security"))


def test_the_tree_must_hold_the_indexes_the_key_was_made_from(tmp_path: Path) -> None:
    """apt's own lists in the bootstrapped tree: if the mirror moved between amiforge's
    look and apt's, the older packages are not stored under the newer key."""
    from builder.archive import tree_matches

    plan = os_plan(tmp_path, "http://deb.debian.org/debian")
    lists = tmp_path / "tree/var/lib/apt/lists"
    lists.mkdir(parents=True)
    state = []
    for uri, suite in plan.sources:
        name = uri.removeprefix("http://").replace("/", "_")
        (lists / f"{name}_dists_{suite}_InRelease").write_text(release(suite))
        state.append({"uri": uri, "suite": suite,
                      "indexes": {"main/binary-amd64/Packages": INDEX}})
    assert tree_matches(tmp_path / "tree", plan, state)
    state[2]["indexes"] = {"main/binary-amd64/Packages": "4" * 64}
    assert not tree_matches(tmp_path / "tree", plan, state)

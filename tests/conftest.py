"""Shared fixtures. Tiers: tests/unit (pure, fast), tests/integration (real builds),
tests/boot (QEMU). `make test` runs them all."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
FIXED_EPOCH = 1767225600  # 2026-01-01T00:00:00Z, for plans and reproducible builds


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers by marker: a test that is neither integration nor boot is a unit test
    (`make check` runs those alone)."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("integration", "boot")):
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def fixed_epoch(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(FIXED_EPOCH))
    return FIXED_EPOCH


@pytest.fixture(autouse=True)
def reproducible_builds(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The builds of the integration and boot tiers are reproducible (SOURCE_DATE_EPOCH):
    the epoch is part of the bootstrap's cache key, so the suite's builds share their
    bootstraps (and a recipe with more packages extends a cached one) only when they agree
    on it. Without this, each tier would bootstrap Debian twice, once per clock."""
    if any(request.node.get_closest_marker(m) for m in ("integration", "boot")):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", str(FIXED_EPOCH))


def needs_root_tools() -> pytest.MarkDecorator:
    missing = [t for t in ("mmdebstrap", "qemu-system-x86_64", "sfdisk", "grub-mkimage")
               if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing) or os.geteuid() != 0,
                              reason=f"needs root and {', '.join(missing) or 'tools'}")


# --- real builds, shared by the integration and boot tiers ------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True)
class Built:
    recipe: str
    output_dir: Path
    manifest: dict
    stderr: str

    def artifact(self, name: str) -> Path:
        return self.output_dir / name


def run_build(*args: str, cwd: Path = ROOT, timeout: int = 900,
              epoch: int | None = None) -> subprocess.CompletedProcess:
    """`build ARGS`; with ``epoch``, a reproducible build (SOURCE_DATE_EPOCH)."""
    env = {**os.environ, **({"SOURCE_DATE_EPOCH": str(epoch)} if epoch is not None else {})}
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, env=env)


def build_shipped(recipe: str, out: Path, cache: Path, ssh_key: Path, *extra: str,
                  epoch: int | None = None) -> Built:
    """Build recipes/RECIPE with the tests' SSH key as its admin key."""
    public = ssh_key.with_suffix(".pub").read_text().strip()
    result = run_build(f"recipes/{recipe}", "--output-dir", str(out), "--cache-dir",
                       str(cache), "--var", f"admin_key={public}", *extra, timeout=1800,
                       epoch=epoch)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "build-manifest.json").read_text())
    return Built(recipe, out, manifest, result.stderr)


@pytest.fixture(scope="session")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "amiforge-tests",
                    "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="session")
def build_recipe(tmp_path_factory: pytest.TempPathFactory, ssh_key: Path, suite_cache: Path):
    """Build a shipped recipe once per test session (with the tests' SSH key), with the
    suite's own stage cache (removed with the session's temporary files); reproducible,
    as the tests' own builds are (``reproducible_builds``)."""
    cache: dict[tuple, Built] = {}

    def build(recipe: str, *extra: str, epoch: int | None = FIXED_EPOCH) -> Built:
        key = (recipe, *extra, epoch)
        if key not in cache:
            out = tmp_path_factory.mktemp(Path(recipe).stem) / "out"
            cache[key] = build_shipped(recipe, out, suite_cache, ssh_key, *extra, epoch=epoch)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def bundle_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A user key pair and a stand-in EC2 key pair (self-signed), as PEM files."""
    directory = tmp_path_factory.mktemp("bundle-keys")
    for name in ("user", "ec2"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", str(directory / f"{name}-key.pem"), "-out",
                        str(directory / f"{name}-cert.pem"), "-days", "3650", "-subj",
                        f"/CN=amiforge-test-{name}"], check=True, capture_output=True)
    return {name: directory / name for name in ("user", "ec2")}


def bundle_args(keys: dict[str, Path]) -> list[str]:
    return ["--user-cert", f"{keys['user']}-cert.pem", "--user-key", f"{keys['user']}-key.pem",
            "--ec2-cert", f"{keys['ec2']}-cert.pem", "--account-id", "123456789012"]


def default_apt_archives() -> Path:
    from builder.build import default_cache_dir

    return default_cache_dir() / "apt-archives"


@pytest.fixture
def fresh_cache(tmp_path: Path) -> Path:
    """An empty stage cache that shares the download cache (apt archives) with the rest of
    the suite, so 'cold' means no stage is cached, not that every package is downloaded."""
    cache = tmp_path / "cache"
    cache.mkdir()
    archives = default_apt_archives()
    archives.mkdir(parents=True, exist_ok=True)
    (cache / "apt-archives").symlink_to(archives)
    return cache


@pytest.fixture(scope="session")
def suite_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage cache shared by the tests that do not need a cold one (one bootstrap)."""
    cache = tmp_path_factory.mktemp("suite-cache")
    archives = default_apt_archives()
    archives.mkdir(parents=True, exist_ok=True)
    (cache / "apt-archives").symlink_to(archives)
    return cache


def read_root_file(disk: Path, path: str) -> bytes:
    """A file of a raw image's root filesystem (its last partition, ext4), read with
    debugfs: no mount, no loop device, no boot."""
    table = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                           check=True).stdout
    partitions = json.loads(table)["partitiontable"]["partitions"]
    offset = partitions[-1]["start"] * 512
    return subprocess.run(["debugfs", "-R", f"cat {path}", f"{disk}?offset={offset}"],
                          capture_output=True, check=True).stdout


def copy_recipes(target: Path) -> Path:
    import shutil

    shutil.copytree(RECIPES, target)
    return target


# --- AWS: a moto server on 127.0.0.1, never AWS ------------------------------------------

@pytest.fixture(scope="session")
def moto_url():
    import logging

    from moto.server import ThreadedMotoServer

    from builder.vm import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def aws_rules(moto_url: str):
    """moto behind the validating layer (tests/awsrules.py): what the tests talk to."""
    import threading

    from tests.awsrules import ValidatingProxy

    proxy = ValidatingProxy(moto_url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    yield proxy
    proxy.shutdown()


@pytest.fixture
def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def aws(capsys: pytest.CaptureFixture[str]):
    """amiforge's AWS commands run in this process (the same code as `build publish ...`,
    without a Python start per call) against URL: returns the exit code, stdout, stderr."""
    from builder.cli import main
    from tests.awstools import REGION

    def call(*args: str, url: str, region: str = REGION) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([*args, "--region", region, "--endpoint-url", url])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return call

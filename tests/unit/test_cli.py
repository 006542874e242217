"""The command line as users meet it: exit codes, one-line errors, no tracebacks, nothing
written on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def build(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/bin"})


def test_missing_recipe(tmp_path: Path) -> None:
    result = build("nope.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: nope.yaml: recipe file not found"
    assert not (tmp_path / "out").exists()


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("name: x\nroot_volume:\n  packages: [a\n")
    result = build("r.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: r.yaml:4:1: YAML syntax error")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_key(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("name: xyz\nroot_volum: {}\n")
    result = build("r.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: r.yaml:2:1: root_volum: unknown key 'root_volum' (did you mean 'root_volume'?)")
    assert not (tmp_path / "out").exists()


def test_missing_src_file(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "name: xyz\nroot_volume:\n  files:\n    - {src: motd, dest: /etc/motd}\n")
    result = build("r.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: r.yaml:4:13: root_volume.files[0].src: 'motd' not found (looked for motd)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["r.yaml", "--format", "iso"], ["r.yaml", "--var", "no-equals"], ["r.yaml", "--bogus"],
    [],
])
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "r.yaml").write_text("name: xyz\n")
    result = build(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_plan_json_and_validate(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("name: xyz\n")
    assert build("validate", "r.yaml", cwd=tmp_path).returncode == 0
    result = build("plan", "r.yaml", "--json", cwd=tmp_path)
    assert result.returncode == 0 and '"disk_size": 2147483648' in result.stdout


def test_version() -> None:
    result = build("--version", cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("amiforge ")


@pytest.fixture
def restored_logging():
    """_logging configures the process's loggers: put them back for the other tests."""
    import logging

    names = ("", "amiforge", "amiforge.run", "sh.command", "botocore.hooks")
    levels = {n: logging.getLogger(n).level for n in names}
    handlers = list(logging.getLogger().handlers)
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger().handlers[:] = handlers


def test_verbose_shows_our_messages_not_the_libraries_internals(restored_logging) -> None:
    import logging

    from builder.cli import _logging

    _logging(verbose=True)
    assert logging.getLogger("amiforge.run").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("sh.command").isEnabledFor(logging.INFO)
    assert not logging.getLogger("botocore.hooks").isEnabledFor(logging.DEBUG)
    _logging(verbose=False)
    assert not logging.getLogger("amiforge.run").isEnabledFor(logging.INFO)


def test_help_lists_every_subcommand(capsys) -> None:
    from builder.cli import SUBCOMMANDS, main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"  build {name}" in out, name


@pytest.mark.parametrize(("files", "args", "message"), [
    ({"ud": b"x" * 16385}, ["--ec2", "--user-data", "ud"],
     "--user-data ud (AWS takes 16 KB): larger than 16384 bytes"),
    ({}, ["--ec2", "--user-data", "/dev/zero"], "/dev/zero (AWS takes 16 KB): not a regular"),
    ({"k.pub": b"ssh-ed25519 AAAA a\nssh-ed25519 BBBB b\n"}, ["--ec2", "--ssh-key", "k.pub"],
     "k.pub: not one OpenSSH public key line"),
    ({"k.pub": b"-----BEGIN OPENSSH PRIVATE KEY-----\n"}, ["--ec2", "--ssh-key", "k.pub"],
     "k.pub: not one OpenSSH public key line"),
    ({"k.pub": "ssh-ed25519 AAAA a\u2028ssh-ed25519 BBBB b\n".encode()},
     ["--ec2", "--ssh-key", "k.pub"], "k.pub: not one OpenSSH public key line"),
    ({}, ["--ec2", "--user-data", "missing"], "--user-data missing (AWS takes 16 KB): cannot "
     "read: No such file"),
    ({"ud": b"#!/bin/sh\n"}, ["--user-data", "ud"], "are for an EC2-like machine (--ec2)"),
])
def test_boot_refuses_metadata_aws_or_openssh_would(tmp_path: Path, files: dict[str, bytes],
                                                    args: list[str], message: str) -> None:
    from builder.host.run import qemu_img
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "disk.qcow2"), "1M")
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    result = build("boot", "disk.qcow2", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_output_directory_boots_only_as_an_instance_of_its_ami(tmp_path: Path) -> None:
    result = build("boot", ".", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: .: an output directory boots as an instance of "
                                     "its AMI (--ec2, without --disk); give an image file "
                                     "otherwise")
    result = build("boot", ".", "--ec2", cwd=tmp_path)
    assert result.returncode == 2 and "register-image.json" in result.stderr

"""Fuzzing the whole command-line surface (no real build): random recipe documents and
--var values through `validate`, `plan --json` and the argument lists of every external
tool. Every run ends in exit 0 or 2, never a traceback, and no recipe value ever stands in
an argument list where the tool could read it as an option."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.cli import main
from builder.host.chroot import chroot_argv
from builder.image.bootloader import EFI_MODULES, grub_mkimage_argv
from builder.image.filesystem import mkfs_ext4_argv, mkfs_xfs_argv
from builder.plan import make_plan
from builder.recipe.load import LoadOptions, load_recipe
from builder.stages.bootstrap import mmdebstrap_argv
from builder.stages.configure import systemctl_argv, useradd_argv
from builder.stages.convert import convert_args
from tests.conftest import ROOT

HOSTILE = ["-x", "--customize-hook=touch /pwned", "--root=/", "a\nb", "it's", "$(id)", "{{",
           "{% raw %}", "\x00", "x" * 300, "/etc/../etc", "ssh-ed25519 AAAA k\nssh-rsa B",
           "http://u:p@h/d", "file:///", "-", "--", "   ", "ünï", "1MiB", "99999999T", "0644"]
TEXT = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=30))
SCALAR = st.one_of(TEXT, st.integers(-5, 10**6), st.booleans(), st.none())

# Per field: values the recipe language accepts; each draw takes one of them, or (one time
# in eight) anything at all, so that most recipes validate and reach the argument lists.
VALID: dict[tuple[str, ...], list[Any]] = {
    ("name",): ["fuzz-image", "web (x) [1].2/3-'4'@_"],
    ("description",): ["a", "it's \"quoted\"\nand two lines"],
    ("os", "release"): ["bookworm", "trixie"],
    ("os", "suites"): [["trixie", "trixie-security"], ["bookworm-backports"]],
    ("os", "security_mirror"): ["http://security.debian.org/debian-security",
                                "https://u:t0k@h.example/debian-security"],
    ("os", "mirror"): ["http://deb.debian.org/debian", "https://u:t0k@h.example:8443/debian",
                       "file:///srv/mirror"],
    ("os", "kernel"): ["linux-image-amd64"],
    ("root_volume", "size"): ["2GiB", "512MiB", 4 << 30],
    ("root_volume", "boot"): ["bios", "uefi", "hybrid"],
    ("root_volume", "hostname"): ["web-1", "debian"],
    ("os", "components"): [["main", "contrib"], ["non-free-firmware"]],
    ("root_volume", "packages"): [["nginx", "g++", "libc6:amd64"]],
    ("root_volume", "kernel_cmdline"): [["quiet", "a='b\"c'", "x=$y;{z}"]],
    ("root_volume", "services", "enable"): [["ssh.service", "getty@ttyS0.service"]],
    ("root_volume", "services", "disable"): [["nginx"]],
}
USER = {"name": ["admin", "_svc"], "groups": [["sudo", "adm"]], "shell": ["/bin/sh"],
        "ssh_authorized_keys": [["ssh-ed25519 AAAA x@y it's me"]]}
FILE = {"dest": ["/etc/motd", "/var/run/x", "/etc/a b"], "content": ["x", "-x\n"],
        "mode": ["0644", "600"], "owner": ["root:root", "root"]}
CONTENT = {"label": ["data", "d_1"], "mount_point": ["/srv/data", "/mnt/x"],
           "filesystem": ["ext4", "xfs"]}


def _value(draw: st.DrawFn, valid: list[Any]) -> Any:
    if draw(st.integers(0, 7)) == 0:
        return draw(st.one_of(SCALAR, st.lists(TEXT, max_size=3)))
    return draw(st.sampled_from(valid))


def _mapping(draw: st.DrawFn, fields: dict[str, list[Any]]) -> dict[str, Any]:
    return {key: _value(draw, valid) for key, valid in fields.items()}


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc.setdefault(key, {})
    doc[path[-1]] = value


@st.composite
def recipes(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": "fuzz-image", "vars": {"v": "x"}}
    for path in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=6, unique=True)):
        _set(doc, path, _value(draw, VALID[path]))
    if draw(st.booleans()):
        _set(doc, ("root_volume", "users"), [_mapping(draw, USER)])
    if draw(st.booleans()):
        _set(doc, ("root_volume", "files"), [_mapping(draw, FILE)])
    if draw(st.booleans()):
        doc["block_device_mappings"] = [{"device": "/dev/sdf", "ebs": {
            "volume_size": 1, "content": _mapping(draw, CONTENT)}}]
    if draw(st.booleans()):
        doc["description"] = "{{ v }}"  # the --var value reaches the plan
    return doc


def _strings(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_strings(v) | _strings(k) for k, v in value.items())) \
            if value else set()
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value)) if value else set()
    return {value} if isinstance(value, str) else set()


def _argvs(plan: Any, work: Path) -> list[list[str]]:
    """Every argument list a build of ``plan`` would run, built without running them."""
    argvs = [mmdebstrap_argv(plan.os, work / "tree", work / "apt", work / "seed"),
             systemctl_argv("enable", list(plan.services_enable)),
             systemctl_argv("disable", list(plan.services_disable)),
             mkfs_ext4_argv(work / "root.img", work / "tree", plan.root.fs_uuid or "",
                            plan.root_label),
             grub_mkimage_argv("x86_64-efi", work / "grub.efi", work / "early.cfg", EFI_MODULES),
             convert_args(work / "disk.raw", work / "disk.qcow2", "qcow2")]
    argvs += [useradd_argv(user) for user in plan.users]
    argvs += [chroot_argv(work / "tree", useradd_argv(user)) for user in plan.users]
    for volume in plan.data_volumes:
        argvs.append(mkfs_ext4_argv(work / "v.img", None, volume.fs_uuid, volume.label))
        argvs.append(mkfs_xfs_argv(work / "v.img", volume.fs_uuid, volume.label, None))
    return argvs


def _options_in(argv: list[str]) -> list[str]:
    """The arguments a getopt-style parser could read as options: those before "--"
    (and that are not the value of the option before them)."""
    end = argv.index("--") if "--" in argv else len(argv)
    return [a for a in argv[1:end] if a.startswith("-")]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=recipes(), var=TEXT)
def test_fuzz_cli_surface(tmp_path_factory: pytest.TempPathFactory, doc: dict[str, Any],
                          var: str) -> None:
    work = tmp_path_factory.mktemp("fuzz")
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc, allow_unicode=True))
    var_arg = f"v={var}"
    code = main(["validate", str(recipe), "--var", var_arg])
    assert code in (0, 2)
    assert main(["plan", "--json", str(recipe), "--var", var_arg]) == code
    if code != 0:
        return
    plan = make_plan(load_recipe(recipe, LoadOptions(variables={"v": var})))
    values = _strings(doc) | {var} | _strings(plan.to_dict()["os"])
    for argv in _argvs(plan, work):
        assert all(isinstance(a, str) for a in argv)
        leaked = [a for a in _options_in(argv) if a in values]
        assert not leaked, (argv, leaked)


def test_plan_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """`build plan | head`: the reader went away; no traceback, the SIGPIPE exit code."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run([sys.executable, "-m", "builder", "plan", "--json",
                             "recipes/debian-12-ebs.yaml"], cwd=ROOT, stdout=write_end,
                            stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE
    assert result.stderr == ""


def test_extends_host_file_never_echoes_it(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("extends: /etc/passwd\nname: xyz\n")
    secret_lines = [line for line in Path("/etc/passwd").read_text().splitlines() if line]
    for extra in ([], ["--allow-host-paths"]):
        assert main(["validate", str(recipe), *extra]) == 2
        err = capsys.readouterr().err
        assert not [line for line in secret_lines if line in err], err


@pytest.mark.parametrize("where", ["recipe", "var-file", "extends"])
def test_special_files_are_refused_before_reading(tmp_path: Path, capsys, where: str) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would block forever
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: xyz\n" if where != "extends" else "extends: fifo.yaml\nname: xyz\n")
    argv = {"recipe": [str(fifo)], "var-file": [str(recipe), "--var-file", str(fifo)],
            "extends": [str(recipe)]}[where]
    assert main(["validate", *argv]) == 2
    assert "not a regular file" in capsys.readouterr().err or where == "extends"


def test_output_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    result = subprocess.run([sys.executable, "-m", "builder", "recipes/debian-12-minimal.yaml",
                             "-o", str(tmp_path / "taken")], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "output directory is a file" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "taken").read_text() == "a file"


def test_plan_json_is_json(capsys) -> None:
    assert main(["plan", "--json", str(ROOT / "recipes/debian-12-minimal.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["name"]

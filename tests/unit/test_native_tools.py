"""The host's dpkg-deb and dash standing in for an emulated tree's own."""

from __future__ import annotations

import dataclasses
import gzip
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.errors import BuildFailed
from builder.stages import bootstrap, native_tools
from tests.unit.test_argv import OS

pytestmark = pytest.mark.unit


def test_wanted_only_for_an_emulated_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    arm64, amd64 = (dataclasses.replace(OS, architecture=a) for a in ("arm64", "amd64"))
    monkeypatch.setattr(native_tools.platform, "machine", lambda: "x86_64")
    assert native_tools.wanted(arm64)
    assert not native_tools.wanted(amd64)
    # dracut's kernel hook makes an initramfs while the stand-ins are in place
    assert not native_tools.wanted(dataclasses.replace(arm64, packages=("dracut",)))
    monkeypatch.setattr(native_tools.platform, "machine", lambda: "aarch64")
    assert not native_tools.wanted(amd64)  # no stand-ins known for this host


def test_only_a_bootstrap_with_stand_ins_depends_on_the_hosts_tools(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_tools.platform, "machine", lambda: "x86_64")
    assert native_tools.cache_key(dataclasses.replace(OS, architecture="amd64")) == {}
    key = native_tools.cache_key(dataclasses.replace(OS, architecture="arm64"))["stand_ins"]
    assert key["format"] == native_tools.FORMAT
    # the tools and the libraries they load (a host's libc update changes them too)
    assert {str(Path(t).resolve()) for t in native_tools.TOOLS} < set(key)
    assert any("libc.so" in path for path in key)


NATIVE = "'/w/my seed/native'"


def _puts_in(hook: str, tool: str) -> bool:
    # kept aside unless what is in place is the stand-in itself; cmp's trouble stops
    return (f"cmp -s \"$1\"{tool} {NATIVE}{tool}; case $? in 0) ;; "
            f'1) cp -p "$1"{tool} "$1"/amiforge-native/tree/ ;; *) false ;; esac;') in hook \
        and f'cp --remove-destination --preserve=mode {NATIVE}{tool} "$1"{tool}' in hook


def test_hooks_keep_the_trees_own_programs_and_put_them_back() -> None:
    extract, essential, customize = native_tools.hooks(Path("/w/my seed/native"))
    initramfs = native_tools.initramfs_hook(Path("/w/my seed/native"))
    assert extract.startswith('--extract-hook=[ ! -e "$1"/amiforge-native ] && ')
    assert essential.startswith("--essential-hook=mkdir -p ")
    assert initramfs.startswith("--customize-hook=mkdir -p ")
    for tool in native_tools.TOOLS:
        apt = tool in native_tools.APT_TOOLS  # maintainer scripts run only these
        assert _puts_in(extract, tool) == apt and _puts_in(essential, tool) == apt
        assert _puts_in(initramfs, tool) == (not apt)
        name = tool.rsplit("/", 1)[1]
        # put back only over its stand-in: a package that replaced it meanwhile is newer
        assert (f'{{ cmp -s "$1"{tool} {NATIVE}{tool} || {{ echo "amiforge: a package '
                f'replaced the stand-in for {tool}" >&2; false; }}; }} && '
                f'mv "$1"/amiforge-native/tree/{name} "$1"{tool} && ') in customize
    for hook in (extract, essential, initramfs):
        assert "cp -R" not in hook  # no folder of the tree takes the host folder's modes
    assert customize.endswith(' && rm -rf "$1"/amiforge-native')


def test_no_stand_in_runs_where_the_answer_depends_on_the_machine() -> None:
    names = {tool.rsplit("/", 1)[1] for tool in native_tools.TOOLS}
    assert not names & {"uname", "arch", "nproc", "id", "chown", "install", "dpkg", "perl",
                        "ls", "stat"}
    assert all(tool.startswith("/usr/bin/") for tool in native_tools.TOOLS)


def _initramfs(*members: bytes, early: bytes = b"") -> bytes:
    return early + b"".join(gzip.compress(member, mtime=0) for member in members)


EARLY = b"070701" + b"0" * 104 + b"kernel/x86/microcode/x.bin\0TRAILER!!!\0" + bytes(300)
HOST_LIB = b"\x7fELF host libc " * 1000


@pytest.fixture
def native(tmp_path: Path) -> Path:
    folder = tmp_path / "native"
    (folder / "amiforge-native").mkdir(parents=True)
    (folder / "amiforge-native/libc.so.6").write_bytes(HOST_LIB)
    (folder / "usr/bin").mkdir(parents=True)
    (folder / "usr/bin/sed").write_bytes(b"\x7fELF x86 sed, loader /amiforge-native/ld.so")
    return folder


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/sed").write_bytes(b"\x7fELF arm64 sed, loader /lib/ld-linux-aarch64")
    (tree / "boot").mkdir()
    (tree / "boot/initrd.img-6.12").write_bytes(
        _initramfs(b"070701 usr/bin/sh ... TRAILER!!!", early=EARLY))
    (tree / "usr/bin/link").symlink_to("/amiforge-native/ld.so")  # links are not read
    return tree


def test_a_tree_without_stand_ins_has_no_leftovers(tmp_path: Path, native: Path) -> None:
    tree = _tree(tmp_path)
    with open(tree / "sparse", "wb") as handle:  # holes are not read
        handle.truncate(1 << 40)
    assert native_tools.leftovers(tree, native) == []


@pytest.mark.parametrize("where", ["usr/bin/sed", "usr/share/deep/copied-by-a-script"])
def test_a_stand_in_left_in_the_tree_is_found(tmp_path: Path, native: Path, where: str) -> None:
    tree = _tree(tmp_path)
    left = tree / where
    left.parent.mkdir(parents=True, exist_ok=True)
    # across the boundary of the chunks the file is read in
    left.write_bytes(b"x" * ((1 << 24) - 5) + b"/amiforge-native/ld.so")
    assert native_tools.leftovers(tree, native) == [left]


def test_a_host_library_left_in_the_tree_is_found(tmp_path: Path, native: Path) -> None:
    tree = _tree(tmp_path)
    (tree / "usr/lib").mkdir()
    (tree / "usr/lib/libc.so.6").write_bytes(HOST_LIB)
    assert native_tools.leftovers(tree, native) == [tree / "usr/lib/libc.so.6"]


@pytest.mark.parametrize("image", [
    _initramfs(b"usr/bin/sed \x7fELF /amiforge-native/ld.so", early=EARLY),
    _initramfs(b"first member", b"a second: /amiforge-native/libc.so.6"),
    _initramfs(b"usr/lib/libc.so.6 " + HOST_LIB),
    EARLY + b"/amiforge-native in an uncompressed archive"])
def test_a_stand_in_in_the_initramfs_is_found(tmp_path: Path, native: Path,
                                              image: bytes) -> None:
    tree = _tree(tmp_path)
    (tree / "boot/initrd.img-6.12").write_bytes(image)
    assert native_tools.leftovers(tree, native) == [tree / "boot/initrd.img-6.12"]


@pytest.mark.parametrize("image", [EARLY + lzma.compress(b"usr/bin/sed" * 100),
                                   EARLY + gzip.compress(b"usr/bin/sed" * 100)[:-9]])
def test_an_initramfs_that_cannot_be_read_fails_closed(tmp_path: Path, native: Path,
                                                       image: bytes) -> None:
    tree = _tree(tmp_path)
    (tree / "boot/initrd.img-6.12").write_bytes(image)
    with pytest.raises(BuildFailed, match=r"/boot/initrd\.img-6\.12: "):
        native_tools.leftovers(tree, native)


def test_an_initramfs_holding_a_stand_in_is_made_again_without_them(
        tmp_path: Path, native: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(cryptsetup's hook copies sed where busybox is not installed.) Anything else left
    fails the bootstrap."""
    tree = _tree(tmp_path)
    initrd = tree / "boot/initrd.img-6.12"
    initrd.write_bytes(_initramfs(b"usr/bin/sed /amiforge-native/ld.so"))
    commands = []

    def update_initramfs(root: Path, command: list[str]) -> None:
        commands.append(command)
        initrd.write_bytes(_initramfs(b"usr/bin/sed arm64"))

    monkeypatch.setattr(bootstrap, "run_in_root", update_initramfs)
    bootstrap._no_stand_ins_left(tree, native)
    assert commands == [["update-initramfs", "-u", "-k", "all"]]
    (tree / "usr/bin/sed").write_bytes(b"/amiforge-native/ld.so")
    with pytest.raises(BuildFailed, match="left in the tree: /usr/bin/sed "):
        bootstrap._no_stand_ins_left(tree, native)


ARM64 = dataclasses.replace(OS, architecture="arm64")


@pytest.mark.skipif(shutil.which("patchelf") is None or not native_tools.wanted(ARM64),
                    reason="needs patchelf on an x86_64 Debian host")
def test_collected_tools_load_from_their_folder(tmp_path: Path) -> None:
    folder = native_tools.collect(tmp_path / "native")
    libraries = folder / "amiforge-native"
    assert {f"/usr/bin/{p.name}" for p in folder.rglob("*")
            if p.parent.name == "bin"} == set(native_tools.TOOLS)
    for tool in native_tools.TOOLS:
        copy = folder / tool.lstrip("/")
        interpreter = subprocess.run(["patchelf", "--print-interpreter", copy],
                                     capture_output=True, text=True, check=True).stdout
        assert interpreter.strip() == "/amiforge-native/ld.so"
        rpath = subprocess.run(["patchelf", "--print-rpath", copy], capture_output=True,
                               text=True, check=True).stdout
        assert rpath.strip() == "/amiforge-native"
        needed = subprocess.run(["patchelf", "--print-needed", copy], capture_output=True,
                                text=True, check=True).stdout.split()
        assert needed and all((libraries / name).is_file() for name in needed)
    # and they run with the folder's loader and libraries
    done = subprocess.run([libraries / "ld.so", "--inhibit-cache", "--library-path",
                           libraries, folder / "usr/bin/dpkg-deb", "--version"],
                          capture_output=True, text=True, env={}, check=True)
    assert "dpkg-deb" in done.stdout
    said = subprocess.run([libraries / "ld.so", "--inhibit-cache", "--library-path",
                           libraries, folder / "usr/bin/dash", "-c", "echo $((6*7))"],
                          capture_output=True, text=True, env={}, check=True)
    assert said.stdout == "42\n"

"""The host's programs standing in for an emulated tree's own while it is made."""

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
    monkeypatch.setattr(native_tools.os.path, "lexists", lambda path: path == "/amiforge-native")
    assert not native_tools.wanted(arm64)  # the host's own folder of that name comes first
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
    assert f"{native_tools.HOST_PERL_BASE}/POSIX.pm" in key  # the host perl's modules
    # and what the hooks do with them
    monkeypatch.setattr(native_tools, "PERL_SCRIPTS", ("/usr/bin/deb-systemd-invoke",))
    changed = native_tools.cache_key(dataclasses.replace(OS, architecture="arm64"))
    assert changed["stand_ins"]["hooks"] != key["hooks"]


NATIVE = "'/w/my seed/native'"


def _puts_in(hook: str, tool: str) -> bool:
    # kept aside (a hard link) unless what is in place is the stand-in; cmp's trouble stops
    return (f"cmp -s \"$1\"{tool} {NATIVE}{tool}; case $? in 0) ;; "
            f'1) ln -f "$1"{tool} "$1"/amiforge-native/tree/ ;; *) false ;; esac;') in hook \
        and f'cp --remove-destination --preserve=mode {NATIVE}{tool} "$1"{tool}' in hook


def test_hooks_keep_the_trees_own_programs_and_put_them_back() -> None:
    _, extract, essential, customize = native_tools.hooks(Path("/w/my seed/native"))
    initramfs = native_tools.initramfs_hook(Path("/w/my seed/native"))
    assert extract.startswith('--extract-hook=[ ! -e "$1"/amiforge-native ] && ')
    assert essential.startswith("--essential-hook=mkdir -p ")
    assert initramfs.startswith("--customize-hook=mkdir -p ")
    for tool in native_tools.REPLACED:
        apt = tool in native_tools.APT_TOOLS  # maintainer scripts run only these
        assert _puts_in(extract, tool) == apt and _puts_in(essential, tool) == apt
        assert _puts_in(initramfs, tool) == (not apt)
        name = tool.rsplit("/", 1)[1]
        # put back only over its stand-in: a package that replaced it meanwhile is newer
        assert (f'{{ cmp -s "$1"{tool} {NATIVE}{tool} || {{ echo "amiforge: a package '
                f'replaced the stand-in for {tool}" >&2; false; }}; }} && '
                f'mv "$1"/amiforge-native/tree/{name} "$1"{tool} && ') in customize
    for hook in (extract, essential, initramfs):
        assert "cp -R" not in hook.replace(f"cp -R {NATIVE}/amiforge-native/perl ", "")
    assert customize.endswith(' && rm -rf "$1"/amiforge-native && '
                              "chroot \"$1\" sed -i '/^DPkg::Path /d' "
                              "/etc/apt/apt.conf.d/99mmdebstrap")


def test_dpkgs_helpers_are_found_first_on_the_search_path_never_in_place() -> None:
    """dpkg starts dpkg-split, dpkg-deb, tar and rm by name: through mmdebstrap's
    environment (the essential packages) and apt's DPkg::Path (the rest)."""
    search, extract, essential, customize = native_tools.hooks(Path("/w/my seed/native"))
    assert search == ('--aptopt=DPkg::Path '
                      '"/amiforge-native/bin:/usr/sbin:/usr/bin:/sbin:/bin"')
    assert (f'&& mkdir "$1"/amiforge-native/bin && cp --preserve=mode '
            f'{NATIVE}/amiforge-native/bin/* "$1"/amiforge-native/bin/ && '
            f'cp -R {NATIVE}/amiforge-native/perl "$1"/amiforge-native/ && ') in extract
    for tool in native_tools.ON_PATH:
        assert native_tools.in_tree(tool) == f"/amiforge-native/bin/{tool.rsplit('/', 1)[1]}"
        assert not any(_puts_in(hook, tool) for hook in (extract, essential, customize))
        assert f'"$1"{tool} ' not in customize
    assert not set(native_tools.ON_PATH) & set(native_tools.REPLACED)


def test_the_search_path_puts_the_stand_ins_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin")
    assert native_tools.search_path() == {"PATH": "/amiforge-native/bin:/usr/local/bin:/usr/bin"}
    monkeypatch.delenv("PATH")
    assert native_tools.search_path()["PATH"].startswith("/amiforge-native/bin:/")


def test_perl_is_diverted_aside_for_the_wrapper_and_back() -> None:
    """Unpacking perl-base with the essential packages puts the tree's perl aside, so the
    wrapper serves while they are configured; dpkg's backup of its diversions does not
    keep the folder's name."""
    _, extract, essential, customize = native_tools.hooks(Path("/w/my seed/native"))
    divert = "dpkg-divert --quiet --local --rename --divert /amiforge-native/tree/perl"
    assert extract.endswith(f'&& chroot "$1" {divert} --add /usr/bin/perl && '
                            f'cp --preserve=mode {NATIVE}/usr/bin/perl "$1"/usr/bin/perl')
    assert "perl" not in essential
    assert (f'{{ cmp -s "$1"/usr/bin/perl {NATIVE}/usr/bin/perl || {{ echo "amiforge: a '
            f'package replaced the stand-in for /usr/bin/perl" >&2; false; }}; }} && '
            f'rm "$1"/usr/bin/perl && chroot "$1" {divert} --remove /usr/bin/perl && '
            'chroot "$1" cp -p /var/lib/dpkg/diversions /var/lib/dpkg/diversions-old && '
            'rm -rf "$1"/amiforge-native && ') in customize


@pytest.mark.parametrize(("argv", "runs"), [
    (["-w", "/usr/share/debconf/frontend", "/var/lib/dpkg/info/x.postinst"], "host"),
    (["/usr/bin/deb-systemd-helper", "enable", "ssh.service"], "host"),
    (["/usr/sbin/update-rc.d", "ssh", "defaults"], "host"),
    (["-e", "print 1"], "tree"),
    (["-T", "/usr/sbin/other"], "tree"),
    (["/usr/bin/deb-systemd-helper.evil"], "tree"),
    (["/usr/bin/linux-version", "/usr/bin/deb-systemd-helper"], "tree")])
def test_the_perl_wrapper_runs_the_hosts_perl_only_for_its_scripts(
        tmp_path: Path, argv: list[str], runs: str) -> None:
    folder = str(tmp_path / "amiforge-native")
    for which, path in (("host", f"{folder}/perl/perl"), ("tree", f"{folder}/tree/perl")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"#!/bin/sh\nprintf '%s\\n' {which} \"$@\"\n")
        Path(path).chmod(0o755)
    wrapper = tmp_path / "perl"
    wrapper.write_text(native_tools.perl_wrapper().replace("/amiforge-native", folder))
    said = subprocess.run(["sh", wrapper, *argv], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    extra = [f"-I{folder}/perl/lib"] if runs == "host" else []
    assert said == [runs, *extra, *argv]


def test_no_stand_in_runs_where_the_answer_depends_on_the_machine() -> None:
    names = {tool.rsplit("/", 1)[1] for tool in native_tools.TOOLS}
    assert not names & {"uname", "arch", "nproc", "id", "chown", "install", "dpkg", "ls",
                        "stat"}  # (perl only for PERL_SCRIPTS, above)
    assert all(tool.startswith("/usr/bin/") for tool in native_tools.TOOLS)


def _initramfs(*members: bytes, early: bytes = b"") -> bytes:
    return early + b"".join(gzip.compress(member, mtime=0) for member in members)


EARLY = b"070701" + b"0" * 104 + b"kernel/x86/microcode/x.bin\0TRAILER!!!\0" + bytes(300)
HOST_LIB = b"\x7fELF host libc " * 1000
PERL_MODULE = b"package strict;\n1;\n"


@pytest.fixture
def native(tmp_path: Path) -> Path:
    folder = tmp_path / "native"
    (folder / "amiforge-native/lib").mkdir(parents=True)
    (folder / "amiforge-native/lib/libc.so.6").write_bytes(HOST_LIB)
    (folder / "amiforge-native/perl/lib").mkdir(parents=True)
    (folder / "amiforge-native/perl/lib/strict.pm").write_bytes(PERL_MODULE)
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
    (tree / "usr/lib/perl-base").mkdir(parents=True)  # the same bytes as the host's
    (tree / "usr/lib/perl-base/strict.pm").write_bytes(PERL_MODULE)
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


def test_mmdebstrap_runs_in_an_empty_folder_with_the_stand_ins_first_on_its_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mmdebstrap reads an --aptopt value naming a readable file (relative to its working
    folder) as that file's contents: a checkout it ran in could plant apt configuration."""
    checkout = tmp_path / "checkout"
    planted = checkout / 'APT::Install-Recommends "false"'
    planted.parent.mkdir(parents=True)
    planted.write_text('APT::Update::Pre-Invoke { "touch /pwned"; };')
    monkeypatch.chdir(checkout)
    (checkout / "out").mkdir()
    calls = []
    monkeypatch.setattr(native_tools, "wanted", lambda os_plan: True)
    monkeypatch.setattr(native_tools, "collect", lambda folder: folder)
    monkeypatch.setattr(bootstrap, "_no_stand_ins_left", lambda tree, native: None)
    monkeypatch.setattr(bootstrap, "run", lambda argv, **kw: calls.append((argv, kw)))
    bootstrap.bootstrap(ARM64, Path("out/tree"), None)
    (argv, options), = calls
    assert options["env"] == native_tools.search_path()
    folder = Path(options["cwd"])
    assert folder.is_absolute() and folder != checkout and folder.parent == checkout / "out"
    assert '--aptopt=APT::Install-Recommends "false"' in argv
    assert argv[argv.index("--") + 2] == str(checkout / "out/tree")  # absolute
    assert not folder.exists()  # removed again


def test_a_perl_script_reaches_the_hosts_perl_through_its_hash_bang_line(
        tmp_path: Path) -> None:
    """As the kernel runs it: the script's #! line names the wrapper (itself a #! script)
    and one argument."""
    folder = str(tmp_path / "amiforge-native")
    host = Path(f"{folder}/perl/perl")
    host.parent.mkdir(parents=True)
    host.write_text("#!/bin/sh\nprintf '%s\\n' host \"$@\"\n")
    host.chmod(0o755)
    script = tmp_path / "usr/bin/deb-systemd-helper"
    wrapper = tmp_path / "usr/bin/perl"
    script.parent.mkdir(parents=True)
    wrapper.write_text(native_tools.perl_wrapper().replace("/amiforge-native", folder)
                       .replace("/usr/bin/deb-systemd-helper", str(script)))
    wrapper.chmod(0o755)
    script.write_text(f"#!{wrapper} -w\nthis is perl\n")
    script.chmod(0o755)
    said = subprocess.run([script, "enable", "a b.service"], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    assert said == ["host", f"-I{folder}/perl/lib", "-w", str(script), "enable", "a b.service"]


@pytest.mark.skipif(shutil.which("patchelf") is None or not native_tools.wanted(ARM64),
                    reason="needs patchelf on an x86_64 Debian host")
def test_collected_tools_load_from_their_folder(tmp_path: Path) -> None:
    folder = native_tools.collect(tmp_path / "native")
    libraries = folder / "amiforge-native/lib"
    copies = {tool: folder / native_tools.in_tree(tool).lstrip("/") for tool in native_tools.TOOLS}
    assert copies["/usr/bin/tar"] == folder / "amiforge-native/bin/tar"
    assert copies["/usr/bin/perl"] == folder / "amiforge-native/perl/perl"
    for copy in copies.values():
        interpreter = subprocess.run(["patchelf", "--print-interpreter", copy],
                                     capture_output=True, text=True, check=True).stdout
        assert interpreter.strip() == "/amiforge-native/lib/ld.so"
        rpath = subprocess.run(["patchelf", "--print-rpath", copy], capture_output=True,
                               text=True, check=True).stdout
        assert rpath.strip() == "/amiforge-native/lib"
        needed = subprocess.run(["patchelf", "--print-needed", copy], capture_output=True,
                                text=True, check=True).stdout.split()
        assert needed and all((libraries / name).is_file() for name in needed)
    assert (folder / "usr/bin/perl").read_text() == native_tools.perl_wrapper()

    def run(program: str, *args: str) -> str:  # with the folder's loader and libraries
        return subprocess.run([libraries / "ld.so", "--inhibit-cache", "--library-path",
                               libraries, folder / program, *args],
                              capture_output=True, text=True, env={}, check=True).stdout

    assert "dpkg-deb" in run("amiforge-native/bin/dpkg-deb", "--version")
    assert run("usr/bin/dash", "-c", "echo $((6*7))") == "42\n"
    # the host's perl with the copies of its perl-base modules, XS ones too (the host's
    # own are on its built-in path here, not in a tree)
    modules = folder / "amiforge-native/perl/lib"
    loaded = run("amiforge-native/perl/perl", f"-I{modules}", "-MPOSIX", "-MFile::Temp",
                 "-MGetopt::Long", "-e", 'print join("\\n", POSIX::floor(6.5), '
                 '@INC{"POSIX.pm", "File/Temp.pm", "Getopt/Long.pm"}, '
                 "@DynaLoader::dl_shared_objects)").splitlines()
    assert loaded[0] == "6"
    assert len(loaded) > 4 and all(path.startswith(f"{modules}/") for path in loaded[1:])

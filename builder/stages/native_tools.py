"""Host-native stand-ins for a foreign tree's most-run programs while the tree is made.

When the tree's architecture is emulated (arm64 on x86_64 through qemu-user), most of a
bootstrap's time goes to programs that do the same work on any architecture, each start
paying qemu-user's cost (about 0.1 s for sed on this kind of machine, 2 ms native):

- the helpers dpkg starts for each package it installs: dpkg-split (is it a part of a split
  package?), dpkg-deb (its control files and data), the tar that dpkg-deb starts for the
  control files and the rm that removes them afterwards (ON_PATH). dpkg starts them by
  name, so they are served from a folder first on the search path of everything the
  bootstrap runs, never in place of the tree's own: unpacking dpkg, tar or coreutils
  cannot displace them, and maintainer scripts that start tar or rm get them too;
- dash, the /bin/sh of every maintainer script (APT_TOOLS: a #! line names it by path,
  so it goes in place of the tree's own, from the essential packages on);
- perl, for the few perl scripts maintainer scripts run most (debconf's frontend,
  deb-systemd-helper: PERL_SCRIPTS) and only for them: the tree's perl is diverted aside
  and a wrapper in its place chooses the host's perl or the tree's own (perl_wrapper());
- while mkinitramfs runs, and only then, gzip (-1 of the 35 MB initramfs: 40 s emulated,
  1 s native) and the text and file utilities mkinitramfs and its hooks start hundreds
  of times: coreutils, sed, grep, find (INITRAMFS_TOOLS). Not those whose answer depends
  on the machine or on name services (uname, nproc, id, chown, install, ls, stat).

What they produce does not depend on the architecture they run as: what lands in the
tree is each package's bytes, and every other command is still the tree's own, emulated.
They are the host release's versions, not the tree's (Debian 12's coreutils 9.1 in a
Debian 13 tree): an option only a newer version knows fails the build loudly, maintainer
scripts run no host utility but ON_PATH's and the host's perl only for PERL_SCRIPTS, and
the initramfs made with them holds the same files, modes and links as one made without
(only its compressed bytes and times differ).

The tree's own programs are kept aside while their stand-ins are in place and put back by
the last hook (hooks()), which also removes the folder. The copies load the host's
libraries from one folder of the tree (patchelf sets their loader and library path to
it), so nothing of the host's lands in a directory the tree's programs look at
(mkinitramfs, for one, mirrors /lib64). dpkg's database hears only of perl's diversion,
and only while the tree is made. leftovers() finds any stand-in or host library left in
the tree or inside its initramfs (the bootstrap then makes the initramfs again without
them, or fails); the boot tests check that dpkg verifies the packages' files, that no
diversion of amiforge's is left and that the folder is gone.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shlex
import shutil
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from builder.errors import BuildFailed
from builder.host.fsutil import data_extents
from builder.host.run import run
from builder.plan import OSPlan, sha256_file

COREUTILS = ("basename", "cat", "chmod", "cp", "cut", "dirname", "head", "ln", "mkdir",
             "mktemp", "mv", "readlink", "realpath", "rmdir", "sort", "tail", "touch", "tr",
             "tsort", "uniq", "wc")  # and rm, ON_PATH
ON_PATH = ("/usr/bin/dpkg-split", "/usr/bin/dpkg-deb", "/usr/bin/tar", "/usr/bin/rm")
APT_TOOLS = ("/usr/bin/dash",)  # from the essential packages on
PERL = "/usr/bin/perl"  # a wrapper (perl_wrapper()), from the essential packages on
INITRAMFS_TOOLS = ("/usr/bin/gzip", "/usr/bin/sed", "/usr/bin/grep", "/usr/bin/find",
                   "/usr/bin/xargs", *(f"/usr/bin/{name}" for name in COREUTILS))
REPLACED = APT_TOOLS + INITRAMFS_TOOLS  # in place of the tree's own
TOOLS = (*ON_PATH, PERL, *REPLACED)
# the packages they come from, whose files the boot tests verify with dpkg
PACKAGES = ("dpkg", "dash", "perl-base", "tar", "gzip", "sed", "grep", "findutils",
            "coreutils")
FOLDER = "/amiforge-native"  # in the tree, while it is made
LIB, BIN = f"{FOLDER}/lib", f"{FOLDER}/bin"  # the host's libraries; ON_PATH's stand-ins
# The host's perl runs only these scripts, the hottest of a bootstrap (each run of
# deb-systemd-helper: about 1 s emulated). Their packages depend on perl-base alone, and
# their code keeps to old perl: the host's perl-base modules serve them. Every other perl
# program runs the tree's own (a newer perl, and modules the host's does not have).
PERL_SCRIPTS = ("/usr/share/debconf/frontend", "/usr/bin/deb-systemd-helper",
                "/usr/sbin/update-rc.d")
PERL_HOME = f"{FOLDER}/perl"  # the host's perl and its perl-base modules, in the tree
PERL_LIB = f"{PERL_HOME}/lib"
HOST_PERL_BASE = "/usr/lib/x86_64-linux-gnu/perl-base"
LOADER = "ld.so"
APT_SEARCH_PATH, DPKG_PATH = "DPkg::Path", "/usr/sbin:/usr/bin:/sbin:/bin"  # apt's default
# the Debian architecture of the host machines whose tools can stand in
HOST_ARCH = {"x86_64": "amd64"}
FORMAT = 4  # bump when what the tree goes through changes, beyond the hooks' text
ASIDE = "tree"  # the tree's own programs, in FOLDER while the stand-ins run
PERL_ASIDE = f"{FOLDER}/{ASIDE}/perl"
# The tree's perl is diverted (dpkg-divert) aside, so that unpacking perl-base with the
# essential packages puts it there and leaves the wrapper in place while they are
# configured. The diversion is removed, and perl renamed back, by the last hook, which
# also makes dpkg's backup of its diversions (the state before the last change) the state
# after it: it would name the folder, in the image.
DIVERT_PERL = f"dpkg-divert --quiet --local --rename --divert {PERL_ASIDE} --{{}} {PERL}"
DIVERSIONS = "/var/lib/dpkg/diversions"
SETTLE_DIVERSIONS = f'chroot "$1" cp -p {DIVERSIONS} {DIVERSIONS}-old'


def wanted(os_plan: OSPlan) -> bool:
    """Whether the tree's Debian architecture is emulated here and the host's tools can
    stand in for its own. Not with dracut: its kernel hook makes an initramfs while apt
    installs, and could copy the stand-in /bin/sh into it. Not on a host that has a FOLDER
    of its own: the search path of mmdebstrap and its hooks on the host names it first."""
    host = HOST_ARCH.get(platform.machine())
    return (host is not None and host != os_plan.architecture
            and not any(p.startswith("dracut") for p in os_plan.packages)
            and all(Path(tool).is_file() for tool in TOOLS) and Path(HOST_PERL_BASE).is_dir()
            and not os.path.lexists(FOLDER))


def cache_key(os_plan: OSPlan) -> dict[str, Any]:
    """What a bootstrap made with stand-ins also depends on (nothing without them)."""
    if not wanted(os_plan):
        return {}
    used = sorted({str(p.resolve()) for tool in TOOLS
                   for p in [Path(tool), *_libraries(Path(tool))]} |
                  {str(p) for p in Path(HOST_PERL_BASE).rglob("*") if p.is_file()})
    how = "\n".join([*hooks(Path("/native")), initramfs_hook(Path("/native")), perl_wrapper()])
    return {"stand_ins": {"format": FORMAT, "hooks": hashlib.sha256(how.encode()).hexdigest(),
                          **{path: sha256_file(Path(path)) for path in used}}}


def collect(folder: Path) -> Path:
    """Lay out in FOLDER, as they go into the tree, copies of the host's tools that load
    their libraries (copied too) from the tree's LIB."""
    libraries = folder / LIB.lstrip("/")
    libraries.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        for path in _libraries(Path(tool)):
            name = LOADER if "ld-linux" in path.name else path.name
            shutil.copy2(path.resolve(), libraries / name)
        copy = folder / in_tree(tool).lstrip("/")
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tool, copy)
        run(patchelf_argv(copy))
    shutil.copytree(HOST_PERL_BASE, folder / PERL_LIB.lstrip("/"))
    wrapper = folder / PERL.lstrip("/")
    wrapper.write_text(perl_wrapper())
    wrapper.chmod(0o755)
    return folder


def in_tree(tool: str) -> str:
    """Where the host's TOOL is in the tree while it serves (the perl of PERL_SCRIPTS is
    in PERL_HOME, and a wrapper in the tree's PERL chooses it or the tree's own)."""
    if tool == PERL:
        return f"{PERL_HOME}/perl"
    return f"{BIN}/{PurePosixPath(tool).name}" if tool in ON_PATH else tool


def perl_wrapper() -> str:
    """The tree's PERL while the stand-ins serve. A script's #! line gives it at most one
    argument before the script's path."""
    scripts = "|".join(PERL_SCRIPTS)
    return (f"#!/bin/sh\n# amiforge: in the tree only while it is made\n"
            f'case $1 in -*) script=$2 ;; *) script=$1 ;; esac\n'
            f'case $script in {scripts}) '
            f'exec {in_tree(PERL)} -I{PERL_LIB} "$@" ;; esac\n'
            f'exec {PERL_ASIDE} "$@"\n')


def search_path() -> dict[str, str]:
    """The environment for mmdebstrap that puts BIN first on the search path of every
    program it runs in the tree (mmdebstrap keeps the caller's PATH). On the host the
    folder does not exist, so the host's programs are found as before."""
    return {"PATH": f"{BIN}:{os.environ.get('PATH') or os.defpath}"}


def patchelf_argv(binary: Path) -> list[str]:
    # DT_RPATH, not DT_RUNPATH: it also serves the libraries' own dependencies
    return ["patchelf", "--set-interpreter", f"{LIB}/{LOADER}", "--force-rpath",
            "--set-rpath", LIB, str(binary)]


@functools.cache
def _libraries(binary: Path) -> list[Path]:
    """Each library ldd lists for BINARY (the loader included), as named there (asked once
    per process: the cache key and collect() both want them)."""
    found = []
    for line in run(["ldd", str(binary)], capture=True).splitlines():
        match = re.search(r"=> (/\S+)|^\s*(/\S+)", line)
        if match is not None:
            found.append(Path(match.group(1) or match.group(2)))
    return found


def hooks(folder: Path) -> list[str]:
    """mmdebstrap options, after every other. Once the essential packages are extracted,
    ON_PATH's and APT_TOOLS' stand-ins go in and perl is diverted aside for the wrapper;
    APT_TOOLS' go in again once dpkg has installed the essential packages (installing dash
    put the tree's own back). The last customize hook puts every program back, and fails
    if a package replaced a stand-in meanwhile (what is kept aside is older), then removes
    the folder and apt's search path for dpkg. (apt gives dpkg the search path DPkg::Path,
    not its own; search_path() serves the hooks and the essential packages' dpkg.)"""
    aside, native = f'"$1"{FOLDER}/{ASIDE}', shlex.quote(str(folder))
    put_back = " && ".join(
        f'{_still_in_place(native, tool)} && mv {aside}/{PurePosixPath(tool).name} "$1"{tool}'
        for tool in REPLACED)
    perl_back = (f'{_still_in_place(native, PERL)} && rm "$1"{PERL} && '
                 f'chroot "$1" {DIVERT_PERL.format("remove")} && '
                 f'{SETTLE_DIVERSIONS}')
    on_path = (f'mkdir "$1"{BIN} && cp --preserve=mode {native}{BIN}/* "$1"{BIN}/ && '
               f'cp -R {native}{PERL_HOME} "$1"{FOLDER}/')
    perl_in = (f'chroot "$1" {DIVERT_PERL.format("add")} && '
               f'cp --preserve=mode {native}{PERL} "$1"{PERL}')
    return [f'--aptopt={APT_SEARCH_PATH} "{BIN}:{DPKG_PATH}"',
            f'--extract-hook=[ ! -e "$1"{FOLDER} ] && {_put_in(native, APT_TOOLS)} && '
            f'{on_path} && {perl_in}',
            f"--essential-hook={_put_in(native, APT_TOOLS)}",
            f'--customize-hook={put_back} && {perl_back} && rm -rf "$1"{FOLDER} && '
            f"chroot \"$1\" sed -i '/^{APT_SEARCH_PATH} /d' /etc/apt/apt.conf.d/99mmdebstrap"]


def _still_in_place(native: str, tool: str) -> str:
    return (f'{{ cmp -s "$1"{tool} {native}{tool} || {{ echo "amiforge: a package replaced '
            f'the stand-in for {tool}" >&2; false; }}; }}')


def initramfs_hook(folder: Path) -> str:
    """The customize hook that puts INITRAMFS_TOOLS' stand-ins in, right before the one
    that makes the initramfs (no package is installed after it)."""
    return f"--customize-hook={_put_in(shlex.quote(str(folder)), INITRAMFS_TOOLS)}"


def _put_in(native: str, tools: tuple[str, ...]) -> str:
    """Keep each of TOOLS aside, never a stand-in still in place (cmp: 0 same, 1 different,
    2 trouble, which stops the hook), then put its stand-in and the libraries in. Kept
    aside by a hard link, the program keeps its inode, times and any other name when it is
    put back. Only files are copied, so no folder of the tree takes the modes of the
    host's."""
    aside = f'"$1"{FOLDER}/{ASIDE}'
    keep = " && ".join(f'{{ cmp -s "$1"{tool} {native}{tool}; case $? in 0) ;; '
                       f'1) ln -f "$1"{tool} {aside}/ ;; *) false ;; esac; }}' for tool in tools)
    return (f'mkdir -p {aside} "$1"{LIB} && {keep} && '
            f'cp --preserve=mode {native}{LIB}/* "$1"{LIB}/ && '
            + " && ".join(f'cp --remove-destination --preserve=mode {native}{tool} "$1"{tool}'
                          for tool in tools))


# --- nothing left ------------------------------------------------------------------------

TRACE = FOLDER.encode()  # in every stand-in (its loader and library path), and the wrapper
ELF_MAGIC, CPIO_MAGIC, GZIP_MAGIC = b"\x7fELF", b"070701", b"\x1f\x8b"
MAX_INITRAMFS = 1 << 30  # unpacked; a larger one is refused, not read


def leftovers(tree: Path, folder: Path) -> list[Path]:
    """Files of TREE that hold a stand-in or one of the host's libraries FOLDER laid out
    (collect()): a file holding the stand-ins' folder's path (each stand-in's loader),
    a file with the same bytes as one of FOLDER's programs and libraries, or an initramfs
    holding either. (Not its perl modules: a tree's own may have the same bytes.)"""
    host = [data for p in folder.rglob("*") if p.is_file()
            if (data := p.read_bytes()).startswith(ELF_MAGIC)]
    digests, sizes = {hashlib.sha256(data).hexdigest() for data in host}, {len(d) for d in host}
    found = []
    for path in _regular_files(tree):
        if (path.lstat().st_size in sizes and sha256_file(path) in digests) or \
                _holds_trace(path) or \
                (path.name.startswith("initrd.img-") and _initramfs_holds(path, host)):
            found.append(path)
    return found


def _regular_files(tree: Path) -> Iterator[Path]:
    def unreadable(error: OSError) -> None:
        raise BuildFailed(f"the tree cannot be checked for host stand-ins: {error}")

    for folder, _, names in os.walk(tree, onerror=unreadable):
        for name in names:
            path = Path(folder, name)
            if stat.S_ISREG(path.lstat().st_mode):
                yield path


def _holds_trace(path: Path) -> bool:
    """Whether PATH's data (its holes skipped) holds TRACE."""
    with path.open("rb") as stream:
        for offset, length in data_extents(stream.fileno(), path.lstat().st_size):
            tail, end = b"", offset + length
            while offset < end:
                block = os.pread(stream.fileno(), min(1 << 24, end - offset), offset)
                if not block:
                    break
                if TRACE in tail + block:
                    return True
                tail, offset = block[-(len(TRACE) - 1):], offset + len(block)
    return False


def _initramfs_holds(path: Path, host: list[bytes]) -> bool:
    unpacked = _unpacked(path, path.read_bytes())
    return TRACE in unpacked or any(data in unpacked for data in host)


def _unpacked(path: Path, data: bytes) -> bytes:
    """An initramfs's bytes with its compressed archive unpacked: the uncompressed cpio
    archives first (early microcode and firmware), then one gzip-compressed archive (the
    compression amiforge's initramfs.conf sets). Anything else is refused, never skipped."""
    offset = 0
    while data.startswith(CPIO_MAGIC, offset):
        trailer = data.find(b"TRAILER!!!", offset)
        if trailer < 0:
            break
        offset = trailer + len(b"TRAILER!!!")
        while offset < len(data) and data[offset] == 0:
            offset += 1
    if offset == len(data):
        return data
    if not data.startswith(GZIP_MAGIC, offset):
        raise BuildFailed(f"/boot/{path.name}: its archive is not gzip-compressed, so it "
                          "cannot be checked for host stand-ins")
    try:
        return data[:offset] + _gunzip(data[offset:])
    except (OSError, EOFError, zlib.error) as error:
        raise BuildFailed(f"/boot/{path.name}: cannot be unpacked to check it for host "
                          f"stand-ins ({error})") from None


def _gunzip(data: bytes) -> bytes:
    """Every gzip member of DATA, unpacked, at most MAX_INITRAMFS bytes."""
    out, rest = [], data
    while rest:
        member = zlib.decompressobj(wbits=31)
        out.append(member.decompress(rest, MAX_INITRAMFS - sum(map(len, out))))
        if member.unconsumed_tail:
            raise OSError(f"more than {MAX_INITRAMFS >> 20} MiB unpacked")
        if not member.eof:
            raise EOFError("a gzip member ends early")
        rest = member.unused_data.lstrip(b"\0")
    return b"".join(out)

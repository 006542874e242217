"""Host-native stand-ins for a foreign tree's most-run programs while the tree is made.

When the tree's architecture is emulated (arm64 on x86_64 through qemu-user), most of a
bootstrap's time goes to programs that do the same work on any architecture, each start
paying qemu-user's cost (about 0.1 s for sed on this kind of machine, 2 ms native):

- dpkg-deb, which decompresses each package's data for dpkg, and dash, the /bin/sh of
  every maintainer script (APT_TOOLS, in place from the essential packages on);
- while mkinitramfs runs, and only then, gzip (-1 of the 35 MB initramfs: 40 s emulated,
  1 s native) and the text and file utilities mkinitramfs and its hooks start hundreds
  of times: coreutils, sed, grep, find (INITRAMFS_TOOLS). Not those whose answer depends
  on the machine or on name services (uname, nproc, id, chown, install, ls, stat).

What they produce does not depend on the architecture they run as: what lands in the
tree is each package's bytes, and every other command is still the tree's own, emulated.
They are the host release's versions, not the tree's (Debian 12's coreutils 9.1 in a
Debian 13 tree): an option only a newer version knows fails the build loudly, maintainer
scripts never run the host's utilities, and the initramfs made with them holds the same
files, modes and links as one made without (only its compressed bytes and times differ).

The tree's own programs are kept aside while their stand-ins are in place and put back by
the last hook (hooks()). The copies load the host's libraries from one folder of the tree
(patchelf sets their loader and library path to it), so nothing of the host's lands in a
directory the tree's programs look at (mkinitramfs, for one, mirrors /lib64). dpkg's
database never hears of any of it. leftovers() finds any stand-in or host library left in
the tree or inside its initramfs (the bootstrap then makes the initramfs again without
them, or fails); the boot tests check that dpkg verifies the packages' files and that the
folder is gone.
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
             "mktemp", "mv", "readlink", "realpath", "rm", "rmdir", "sort", "tail", "touch",
             "tr", "tsort", "uniq", "wc")
APT_TOOLS = ("/usr/bin/dpkg-deb", "/usr/bin/dash")  # from the essential packages on
INITRAMFS_TOOLS = ("/usr/bin/gzip", "/usr/bin/sed", "/usr/bin/grep", "/usr/bin/find",
                   "/usr/bin/xargs", *(f"/usr/bin/{name}" for name in COREUTILS))
TOOLS = APT_TOOLS + INITRAMFS_TOOLS
# the packages they come from, whose files the boot tests verify with dpkg
PACKAGES = ("dpkg", "dash", "gzip", "sed", "grep", "findutils", "coreutils")
FOLDER = "/amiforge-native"  # in the tree, while it is made
LOADER = "ld.so"
# the Debian architecture of the host machines whose tools can stand in
HOST_ARCH = {"x86_64": "amd64"}
FORMAT = 3  # bump when the hooks change what the tree goes through
ASIDE = "tree"  # the tree's own programs, in FOLDER while the stand-ins run


def wanted(os_plan: OSPlan) -> bool:
    """Whether the tree's Debian architecture is emulated here and the host's tools can
    stand in for its own. Not with dracut: its kernel hook makes an initramfs while apt
    installs, and could copy the stand-in /bin/sh into it."""
    host = HOST_ARCH.get(platform.machine())
    return (host is not None and host != os_plan.architecture
            and not any(p.startswith("dracut") for p in os_plan.packages)
            and all(Path(tool).is_file() for tool in TOOLS))


def cache_key(os_plan: OSPlan) -> dict[str, Any]:
    """What a bootstrap made with stand-ins also depends on (nothing without them)."""
    if not wanted(os_plan):
        return {}
    used = sorted({str(p.resolve()) for tool in TOOLS
                   for p in [Path(tool), *_libraries(Path(tool))]})  # host updates count
    return {"stand_ins": {"format": FORMAT, **{path: sha256_file(Path(path)) for path in used}}}


def collect(folder: Path) -> Path:
    """Lay out in FOLDER, as they go into the tree, copies of the host's tools that load
    their libraries (copied too) from the tree's FOLDER."""
    libraries = folder / FOLDER.lstrip("/")
    libraries.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        for path in _libraries(Path(tool)):
            name = LOADER if "ld-linux" in path.name else path.name
            shutil.copy2(path.resolve(), libraries / name)
        copy = folder / tool.lstrip("/")
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tool, copy)
        run(patchelf_argv(copy))
    return folder


def patchelf_argv(binary: Path) -> list[str]:
    # DT_RPATH, not DT_RUNPATH: it also serves the libraries' own dependencies
    return ["patchelf", "--set-interpreter", f"{FOLDER}/{LOADER}", "--force-rpath",
            "--set-rpath", FOLDER, str(binary)]


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
    """mmdebstrap hooks, after every other: APT_TOOLS' stand-ins go in once the essential
    packages are extracted, and again once dpkg has installed them (installing dash and
    dpkg put the tree's own back); the last customize hook puts every program back, and
    fails if a package replaced a stand-in meanwhile (what is kept aside is older)."""
    aside, native = f'"$1"{FOLDER}/{ASIDE}', shlex.quote(str(folder))
    put_back = " && ".join(
        f'{{ cmp -s "$1"{tool} {native}{tool} || {{ echo "amiforge: a package replaced the '
        f'stand-in for {tool}" >&2; false; }}; }} && '
        f'mv {aside}/{PurePosixPath(tool).name} "$1"{tool}' for tool in TOOLS)
    return [f'--extract-hook=[ ! -e "$1"{FOLDER} ] && {_put_in(native, APT_TOOLS)}',
            f"--essential-hook={_put_in(native, APT_TOOLS)}",
            f'--customize-hook={put_back} && rm -rf "$1"{FOLDER}']


def initramfs_hook(folder: Path) -> str:
    """The customize hook that puts INITRAMFS_TOOLS' stand-ins in, right before the one
    that makes the initramfs (no package is installed after it)."""
    return f"--customize-hook={_put_in(shlex.quote(str(folder)), INITRAMFS_TOOLS)}"


def _put_in(native: str, tools: tuple[str, ...]) -> str:
    """Keep each of TOOLS aside, never a stand-in still in place (cmp: 0 same, 1 different,
    2 trouble, which stops the hook), then put its stand-in and the libraries in. Only
    files are copied, so no folder of the tree takes the modes of the host's."""
    aside = f'"$1"{FOLDER}/{ASIDE}'
    keep = " && ".join(f'{{ cmp -s "$1"{tool} {native}{tool}; case $? in 0) ;; '
                       f'1) cp -p "$1"{tool} {aside}/ ;; *) false ;; esac; }}' for tool in tools)
    return (f"mkdir -p {aside} && {keep} && "
            f'cp --preserve=mode {native}{FOLDER}/* "$1"{FOLDER}/ && '
            + " && ".join(f'cp --remove-destination --preserve=mode {native}{tool} "$1"{tool}'
                          for tool in tools))


# --- nothing left ------------------------------------------------------------------------

TRACE = FOLDER.encode()  # in every stand-in (its loader and library path)
CPIO_MAGIC, GZIP_MAGIC = b"070701", b"\x1f\x8b"
MAX_INITRAMFS = 1 << 30  # unpacked; a larger one is refused, not read


def leftovers(tree: Path, folder: Path) -> list[Path]:
    """Files of TREE that hold a stand-in or one of the host's libraries FOLDER laid out
    (collect()): a file holding the stand-ins' folder's path (each stand-in's loader),
    a file with the same bytes as one of FOLDER's, or an initramfs holding either."""
    host = [p.read_bytes() for p in folder.rglob("*") if p.is_file()]
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

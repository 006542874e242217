"""Host-native stand-ins for a foreign tree's most-run programs while the tree is made.

When the tree's architecture is emulated (arm64 on x86_64 through qemu-user), most of a
bootstrap's time goes to programs that do the same work on any architecture, each start
paying qemu-user's cost (about 0.1 s for sed on this kind of machine, 2 ms native):

- dpkg-deb and gzip, which decompress each package's data and compress the initramfs
  (emulated, gzip -1 of the 35 MB initramfs takes 40 s; native, 1 s);
- dash, the /bin/sh of every maintainer script and of mkinitramfs and its hooks;
- the text and file utilities those scripts start hundreds of times (coreutils, sed,
  grep, find). Not those whose answer depends on the machine or on name services
  (uname, nproc, id, chown, install): they stay the tree's own.

What they produce does not depend on the architecture they run as: what lands in the
tree is each package's bytes, and every other command the scripts start is still the
tree's own, emulated. Made with them, the initramfs holds the same files, modes and
links as one made without (only its compressed bytes and times differ). So once the
essential packages are extracted, copies of the host's take their place; the tree's own
are kept aside and put back when the tree is done, after the initramfs is made (see
hooks()). The copies load the host's libraries from one folder of the tree (patchelf sets
their loader and library path to it), so nothing of the host's lands in a directory the
tree's programs look at (mkinitramfs, for one, mirrors /lib64). dpkg's database never hears
of any of it. check_gone() fails the bootstrap if any trace of a stand-in is left in the
tree or its initramfs; the boot tests check that dpkg verifies the packages' files and
that the folder is gone.
"""

from __future__ import annotations

import gzip
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
from builder.host.run import run
from builder.plan import OSPlan, sha256_file

COREUTILS = ("basename", "cat", "chmod", "cp", "cut", "dirname", "head", "ln", "ls", "mkdir",
             "mktemp", "mv", "readlink", "realpath", "rm", "rmdir", "sort", "stat", "tail",
             "touch", "tr", "tsort", "uniq", "wc")
TOOLS = ("/usr/bin/dpkg-deb", "/usr/bin/dash", "/usr/bin/gzip", "/usr/bin/sed", "/usr/bin/grep",
         "/usr/bin/find", "/usr/bin/xargs", *(f"/usr/bin/{name}" for name in COREUTILS))
# the packages they come from, whose files the boot tests verify with dpkg
PACKAGES = ("dpkg", "dash", "gzip", "sed", "grep", "findutils", "coreutils")
FOLDER = "/amiforge-native"  # in the tree, while it is made
LOADER = "ld.so"
# the Debian architecture of the host machines whose tools can stand in
HOST_ARCH = {"x86_64": "amd64"}
FORMAT = 2  # bump when the hooks change what the tree goes through
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
    return {"stand_ins": {"format": FORMAT, **{tool: sha256_file(Path(tool)) for tool in TOOLS}}}


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


def _libraries(binary: Path) -> list[Path]:
    """Each library ldd lists for BINARY (the loader included), as named there."""
    found = []
    for line in run(["ldd", str(binary)], capture=True).splitlines():
        match = re.search(r"=> (/\S+)|^\s*(/\S+)", line)
        if match is not None:
            found.append(Path(match.group(1) or match.group(2)))
    return found


def hooks(folder: Path) -> list[str]:
    """mmdebstrap hooks. The stand-ins go in once the essential packages are extracted,
    and again once dpkg has installed them (installing dash, coreutils and the others put
    the tree's own programs back); the tree's own programs are kept aside each time. They
    are put back by the last customize hook, so these go after every other hook (the
    initramfs is made with them: check_gone() then proves nothing of them went into it)."""
    aside, native = f'"$1"{FOLDER}/{ASIDE}', shlex.quote(str(folder))
    # keep the tree's own program aside, never a stand-in still in place (cmp: 0 same, 1
    # different, 2 trouble, which stops the hook); only files are copied, so no folder
    # of the tree takes the modes of the host's
    keep = " && ".join(f'{{ cmp -s "$1"{tool} {native}{tool}; case $? in 0) ;; '
                       f'1) cp -p "$1"{tool} {aside}/ ;; *) false ;; esac; }}' for tool in TOOLS)
    put_in = (f"mkdir -p {aside} && {keep} && "
              f'cp --preserve=mode {native}{FOLDER}/* "$1"{FOLDER}/ && '
              + " && ".join(f'cp --remove-destination --preserve=mode {native}{tool} "$1"{tool}'
                            for tool in TOOLS))
    put_back = " && ".join(f'mv {aside}/{PurePosixPath(tool).name} "$1"{tool}' for tool in TOOLS)
    return [f'--extract-hook=[ ! -e "$1"{FOLDER} ] && {put_in}',
            f"--essential-hook={put_in}",
            f'--customize-hook={put_back} && rm -rf "$1"{FOLDER}']


# --- no trace left ----------------------------------------------------------------------

TRACE = FOLDER.encode()  # in every stand-in (its loader and library path) and its folder
CPIO_MAGIC, GZIP_MAGIC = b"070701", b"\x1f\x8b"


def check_gone(tree: Path) -> None:
    """Fail unless every stand-in is gone from TREE: no file holds the stand-ins' folder
    (their loader's path is in each of them), and no initramfs does once unpacked."""
    for path in _regular_files(tree):
        if _holds_trace(path) or (path.name.startswith("initrd.img-")
                                  and TRACE in _unpacked(path, path.read_bytes())):
            raise BuildFailed(f"a host stand-in for an emulated program was left in the "
                              f"tree: /{path.relative_to(tree)} (a maintainer script or an "
                              "initramfs hook copied it)")


def _regular_files(tree: Path) -> Iterator[Path]:
    for folder, _, names in os.walk(tree):
        for name in names:
            path = Path(folder, name)
            if stat.S_ISREG(path.lstat().st_mode):
                yield path


def _holds_trace(path: Path, chunk: int = 1 << 24) -> bool:
    with path.open("rb") as stream:
        tail = b""
        while block := stream.read(chunk):
            if TRACE in tail + block:
                return True
            tail = block[-(len(TRACE) - 1):]
    return False


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
        return data[:offset] + gzip.decompress(data[offset:])
    except (OSError, EOFError, zlib.error) as error:
        raise BuildFailed(f"/boot/{path.name}: cannot be unpacked to check it for host "
                          f"stand-ins ({error})") from None

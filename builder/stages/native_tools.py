"""Host-native stand-ins for two of a foreign tree's programs while the tree is made.

When the tree's architecture is emulated (arm64 on x86_64 through qemu-user), much of a
bootstrap's time goes to two programs that do the same work on any architecture:

- dpkg-deb, which decompresses each package's data.tar.xz for dpkg (dpkg only asks it
  for a package's control files and its filesystem tar stream);
- dash, the /bin/sh of every maintainer script and of mkinitramfs and its hooks.

What they produce does not depend on the architecture they run as: what lands in the
tree is each package's bytes, and every command the scripts start is still the tree's
own, emulated. So once the essential packages are extracted, copies of the host's take
their place; the tree's own are kept aside and put back when the tree is done (see
hooks()). The copies load the host's libraries from one folder of the tree (patchelf sets
their loader and library path to it), so nothing of the host's lands in a directory the
tree's programs look at (mkinitramfs, for one, mirrors /lib64). dpkg's database never hears
of any of it. The boot tests check that dpkg verifies both packages' files and that the
folder is gone.
"""

from __future__ import annotations

import platform
import re
import shlex
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from builder.host.run import run
from builder.plan import OSPlan, sha256_file

TOOLS = ("/usr/bin/dpkg-deb", "/usr/bin/dash")
FOLDER = "/amiforge-native"  # in the tree, while it is made
LOADER = "ld.so"
# the Debian architecture of the host machines whose tools can stand in
HOST_ARCH = {"x86_64": "amd64"}
FORMAT = 1  # bump when the hooks change what the tree goes through
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
    and again once dpkg has installed them (installing dash and dpkg put the tree's own
    programs back); the tree's own programs are kept aside each time. They are put back
    before the initramfs is made (nothing can copy a stand-in into it), and a tree that
    still holds one fails the bootstrap. dpkg's database never hears of any of it."""
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
    gone = " && ".join(f'! grep -q {FOLDER} "$1"{tool}' for tool in TOOLS)
    return [f'--extract-hook=[ ! -e "$1"{FOLDER} ] && {put_in}',
            f"--essential-hook={put_in}",
            f'--customize-hook={put_back} && rm -rf "$1"{FOLDER} && {gone}']

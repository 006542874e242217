"""Stage 1: bootstrap the root tree with mmdebstrap (the package set is final here), or
complete a cached bootstrap that lacks only some packages with apt."""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
from pathlib import Path
from typing import Any

from builder.archive import cache_relevant, tree_matches
from builder.errors import BuildFailed, ToolFailed
from builder.host.aptauth import AUTH_FILE
from builder.host.chroot import prepared_root, run_in_root
from builder.host.downloads import private_copy, publish
from builder.host.run import run
from builder.image.filesystem import clamp_times
from builder.pipeline.cache import Entry, StageCache, copy_tree
from builder.pipeline.runner import Context
from builder.plan import OSPlan, Plan
from builder.stages import native_tools
from builder.templates import render_template, templates_digest
from builder.tools import STAGE_FORMAT, tool_version

log = logging.getLogger("amiforge.bootstrap")

# Files in place before the kernel package is installed, so that its initramfs is small:
# (file name, directory in the tree, template, mode).
SEED_FILES = (
    ("amiforge.conf", "/etc/initramfs-tools/conf.d", "initramfs.conf.j2", 0o644),
    ("amiforge-drivers", "/etc/initramfs-tools/hooks", "initramfs-drivers.hook.j2", 0o755),
)

# The initramfs is made once, when every package is in place: while apt installs, the
# kernel's hook and each package's "update-initramfs" trigger would make it twice or more
# (about 50 s each when the tree's architecture is emulated). update-initramfs is diverted
# to a no-op before the first non-essential package is unpacked (the diskimage-builder and
# live-build idiom), and put back before the one real run. dpkg's backup of its diversions
# is then made the same as the diversions (else it would keep the bootstrap's, in the image).
UPDATE_INITRAMFS = "/usr/sbin/update-initramfs"
DIVERT = (f"dpkg-divert --quiet --local --rename --divert {UPDATE_INITRAMFS}.amiforge "
          f"--{{}} {UPDATE_INITRAMFS}")
DEFER_INITRAMFS = (f'chroot "$1" {DIVERT.format("add")} && '
                   f"printf '#!/bin/sh\\nexit 0\\n' > \"$1\"{UPDATE_INITRAMFS} && "
                   f'chmod 755 "$1"{UPDATE_INITRAMFS}')
MAKE_INITRAMFS = (f'rm -f "$1"{UPDATE_INITRAMFS} && chroot "$1" {DIVERT.format("remove")} && '
                  f'{native_tools.SETTLE_DIVERSIONS} && if [ -x "$1"{UPDATE_INITRAMFS} ]; then '
                  f'chroot "$1" update-initramfs -c -k all; fi')
# openssh-server's postinst makes the host keys unless they exist (RSA 3072 alone takes
# seconds emulated); the image must not have any (configure removes them, the first boot
# makes its own), so empty placeholders stand in while apt installs and go afterwards.
HOST_KEYS = " ".join(f'"$1"/etc/ssh/ssh_host_{kind}_key' for kind in ("rsa", "ecdsa", "ed25519"))
PLACE_HOST_KEYS = f'mkdir -p "$1"/etc/ssh && touch {HOST_KEYS}'
DROP_HOST_KEYS = (f'for key in {HOST_KEYS}; do if [ ! -s "$key" ]; then rm -f "$key"; fi; done'
                  ' && rmdir --ignore-fail-on-non-empty "$1"/etc/ssh')
# dpkg skips its fsync()s while the tree is made (a failed bootstrap is thrown away
# whole); the option is taken out of the image's dpkg configuration afterwards.
UNSAFE_IO = "force-unsafe-io"
# (Files of the tree are changed from inside it, where a link in it cannot lead outside.)
SAFE_IO_AGAIN = (f"chroot \"$1\" sed -i '/^{UNSAFE_IO}$/d' "
                 "/etc/dpkg/dpkg.cfg.d/99mmdebstrap")


def mmdebstrap_argv(os_plan: OSPlan, target: Path, apt_cache: Path | None,
                    seed: Path | None = None, auth: Path | None = None,
                    native: Path | None = None) -> list[str]:
    """mmdebstrap's argument list; a pure function so tests can check it."""
    argv = [
        "mmdebstrap",
        "--mode=unshare",
        "--variant=minbase",
        f"--architectures={os_plan.architecture}",
        f"--components={','.join(os_plan.components)}",
        f"--include={','.join(os_plan.packages)}",
        "--aptopt=APT::Install-Recommends \"false\"",
        "--aptopt=Acquire::Languages \"none\"",
        *(f"--dpkgopt={option}" for option in (*os_plan.dpkg_options, UNSAFE_IO)),
        f"--customize-hook={SAFE_IO_AGAIN}",
        f"--essential-hook={PLACE_HOST_KEYS}",
        f"--customize-hook={DROP_HOST_KEYS}",
        # Keep the package lists: a cached bootstrap can then take more packages without
        # downloading them again. The configure stage removes them from the image.
        "--skip=cleanup/apt/lists",
    ]
    if seed is not None:
        folders = sorted({folder for _, folder, _, _ in SEED_FILES})
        argv.append("--essential-hook=mkdir -p " +
                    " ".join(f'"$1"{shlex.quote(folder)}' for folder in folders))
        argv += [f"--essential-hook=copy-in {shlex.quote(str(seed / name))} {folder}"
                 for name, folder, _, _ in SEED_FILES]
        argv.append(f"--essential-hook={DEFER_INITRAMFS}")
        if native is not None:  # mkinitramfs's utilities, native for its run only
            argv.append(native_tools.initramfs_hook(native))
        argv.append(f"--customize-hook={MAKE_INITRAMFS}")
    if auth is not None:  # the mirror's credentials, for apt during the bootstrap only
        folder = shlex.quote(AUTH_FILE.rsplit("/", 1)[0])
        argv += [f"--setup-hook=mkdir -p \"$1\"{folder}",
                 f"--setup-hook=upload {shlex.quote(str(auth))} {shlex.quote(AUTH_FILE)}",
                 f"--customize-hook=rm -f \"$1\"{shlex.quote(AUTH_FILE)}"]
    if apt_cache is not None:
        # Keep downloaded .debs in a cache shared by builds (mmdebstrap's documented idiom).
        argv += [
            "--skip=essential/unlink",
            "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
            f"--setup-hook=sync-in {shlex.quote(str(apt_cache))} /var/cache/apt/archives/",
            f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(str(apt_cache))}",
        ]
    if native is not None:  # last: the stand-ins serve every hook before theirs
        argv += native_tools.hooks(native)
    # "--": the suite, target and sources are never read as options, whatever they hold;
    # each source a whole sources.list line (values checked by the recipe's patterns)
    components = " ".join(os_plan.components)
    sources = [f"deb {uri} {suite} {components}" for uri, suite in os_plan.sources]
    return [*argv, "--", os_plan.release, str(target), *sources]


def bootstrap(os_plan: OSPlan, target: Path, apt_cache: Path | None) -> None:
    """mmdebstrap into TARGET. APT_CACHE (shared with other builds, maybe running now) is
    read through a private copy and gets the new downloads once mmdebstrap is done.

    mmdebstrap runs in an empty folder of its own: it reads an --aptopt or --dpkgopt
    value that names a readable file (relative to its working folder) as that file's
    contents, so a checkout it ran in could plant apt configuration for root."""
    target = target.absolute()
    empty = target.parent / f"{target.name}-cwd"
    empty.mkdir()
    downloads = None
    if apt_cache is not None:
        apt_cache.mkdir(parents=True, exist_ok=True)
        downloads = target.parent / f"{target.name}-downloads"
        private_copy(apt_cache, downloads)
    seed = write_seed_files(os_plan, target.parent / f"{target.name}-seed")
    auth = None
    if os_plan.apt_auth:
        auth = seed / "apt-auth.conf"
        auth.touch(mode=0o600)
        auth.write_text(os_plan.apt_auth)
    native = None
    if native_tools.wanted(os_plan):
        native = native_tools.collect(seed / "native")
    try:
        run(mmdebstrap_argv(os_plan, target, downloads, seed, auth, native), cwd=empty,
            env=None if native is None else native_tools.search_path())
        if native is not None:
            _no_stand_ins_left(target, native)
        if apt_cache is not None and downloads is not None:
            publish(downloads, apt_cache)
    finally:
        if auth is not None:
            auth.unlink(missing_ok=True)
        if downloads is not None:
            shutil.rmtree(downloads, ignore_errors=True)
        shutil.rmtree(empty, ignore_errors=True)


def _no_stand_ins_left(tree: Path, native: Path) -> None:
    """Fail unless every host stand-in is gone from TREE. An initramfs hook may copy one of
    mkinitramfs's utilities into the initramfs (cryptsetup's copies sed where busybox is
    not installed): then the initramfs is made again, with the tree's own programs."""
    left = native_tools.leftovers(tree, native)
    if left and all(path.name.startswith("initrd.img-") for path in left):
        log.warning("an initramfs hook copied a host stand-in into %s: making it again "
                    "without them (slower, emulated)", ", ".join(p.name for p in left))
        run_in_root(tree, ["update-initramfs", "-u", "-k", "all"])
        left = native_tools.leftovers(tree, native)
    if left:
        raise BuildFailed(f"a host stand-in for an emulated program was left in the tree: "
                          f"{', '.join('/' + str(p.relative_to(tree)) for p in left[:5])} "
                          "(a maintainer script copied it)")


def write_seed_files(os_plan: OSPlan, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, _, template, mode in SEED_FILES:
        path = folder / name
        path.write_text(render_template(template, modules=os_plan.initramfs_modules))
        path.chmod(mode)
    return folder


# --- the stage ---------------------------------------------------------------------------

def inputs(plan: Plan, extras: dict[str, Any]) -> dict[str, Any]:
    """What the bootstrapped tree depends on (its cache key)."""
    return {"os": plan.to_dict()["os"], "format": STAGE_FORMAT,
            # the archive moves (security updates) under the same suite names: a bootstrap
            # made from older package indexes is stale
            "archive": cache_relevant(extras.get("archive")),
            "mmdebstrap": tool_version("mmdebstrap", "--version"),
            "seed": templates_digest(t for _, _, t, _ in SEED_FILES),
            # a reproducible build clamps the bootstrapped tree's times (so that its
            # configure layer holds only what configure changed)
            "epoch": plan.source_date_epoch if plan.reproducible else None,
            **native_tools.cache_key(plan.os)}


def run_stage(ctx: Context) -> dict[str, Any]:
    """Bootstrap into ``ctx.output``: from a cached bootstrap that lacks only some
    packages, completed with apt ("extended"), or with mmdebstrap."""
    plan, cache, tree = ctx.plan, ctx.cache, ctx.output
    facts = {"archive": ctx.extras.get("archive")}
    if cache is None:
        bootstrap(plan.os, tree, None)
        return facts
    base = _subset_entry(cache, ctx.inputs)
    with contextlib.ExitStack() as held:
        if base is not None:  # held while copied, so that pruning cannot remove it midway
            held.enter_context(cache.in_use("bootstrap", base.key))
            if cache.lookup("bootstrap", base.key) is None:
                base = None
            else:
                copy_tree(base.path / "tree", tree)
    if base is None:
        bootstrap(plan.os, tree, cache.root / "apt-archives")
    else:
        _install_more(tree, list(plan.os.packages), plan.os.apt_auth)
        ctx.source = "extended"
    archive = ctx.extras.get("archive")
    if archive is not None and not tree_matches(tree, plan.os, archive):
        raise BuildFailed("the archive changed while the bootstrap ran (apt read other "
                          "package indexes than amiforge did a moment before): build again")
    if plan.reproducible:
        clamp_times(tree, plan.source_date_epoch, atimes=False)
    return facts


def _subset_entry(cache: StageCache, inputs: dict[str, Any]) -> Entry | None:
    """The cached bootstrap with the most packages, made the same way, lacking only some."""
    wanted = set(inputs["os"]["packages"])

    def same_except_packages(other: dict[str, Any]) -> bool:
        strip = lambda d: {**d, "os": {**d["os"], "packages": None}}  # noqa: E731
        return strip(other) == strip(inputs)

    candidates = [e for e in cache.entries() if e.stage == "bootstrap"]
    usable = [(len(m["os"]["packages"]), e) for e in candidates
              if same_except_packages(m := e.meta["inputs"])
              and set(m["os"]["packages"]) < wanted]
    return max(usable, key=lambda pair: pair[0])[1] if usable else None


def _install_more(tree: Path, packages: list[str], apt_auth: str | None) -> None:
    install = ["apt-get", "install", "-y", "--no-install-recommends", "--", *packages]
    with prepared_root(tree, apt_auth):
        try:
            run_in_root(tree, install)
        except ToolFailed:  # the cached package lists may be stale: refresh once
            run_in_root(tree, ["apt-get", "update"])
            run_in_root(tree, install)
        run_in_root(tree, ["apt-get", "clean"])

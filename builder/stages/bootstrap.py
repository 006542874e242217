"""Stage 1: bootstrap the root tree with mmdebstrap (the package set is final here)."""

from __future__ import annotations

import shlex
from pathlib import Path

from builder.aptauth import AUTH_FILE
from builder.plan import OSPlan
from builder.run import run
from builder.templates import render_template

# Files in place before the kernel package is installed, so that its initramfs is made
# once, small: (file name, directory in the tree, template, mode).
SEED_FILES = (
    ("amiforge.conf", "/etc/initramfs-tools/conf.d", "initramfs.conf.j2", 0o644),
    ("amiforge-drivers", "/etc/initramfs-tools/hooks", "initramfs-drivers.hook.j2", 0o755),
)


def mmdebstrap_argv(os_plan: OSPlan, target: Path, apt_cache: Path | None,
                    seed: Path | None = None, auth: Path | None = None) -> list[str]:
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
        *(f"--dpkgopt={option}" for option in os_plan.dpkg_options),
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
    # "--": the suite, target and mirror are never read as options, whatever they hold
    return [*argv, "--", os_plan.release, str(target), os_plan.mirror]


def bootstrap(os_plan: OSPlan, target: Path, apt_cache: Path | None) -> None:
    if apt_cache is not None:
        apt_cache.mkdir(parents=True, exist_ok=True)
    seed = write_seed_files(os_plan, target.parent / f"{target.name}-seed")
    auth = None
    if os_plan.apt_auth:
        auth = seed / "apt-auth.conf"
        auth.touch(mode=0o600)
        auth.write_text(os_plan.apt_auth)
    try:
        run(mmdebstrap_argv(os_plan, target, apt_cache, seed, auth))
    finally:
        if auth is not None:
            auth.unlink(missing_ok=True)


def write_seed_files(os_plan: OSPlan, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, _, template, mode in SEED_FILES:
        path = folder / name
        path.write_text(render_template(template, modules=os_plan.initramfs_modules))
        path.chmod(mode)
    return folder

"""Stage 1: bootstrap the root tree with mmdebstrap (the package set is final here)."""

from __future__ import annotations

import shlex
from pathlib import Path

from builder.plan import OSPlan
from builder.run import run


def mmdebstrap_argv(os_plan: OSPlan, target: Path, apt_cache: Path | None) -> list[str]:
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
    if apt_cache is not None:
        # Keep downloaded .debs in a cache shared by builds (mmdebstrap's documented idiom).
        argv += [
            "--skip=essential/unlink",
            "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
            f"--setup-hook=sync-in {shlex.quote(str(apt_cache))} /var/cache/apt/archives/",
            f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(str(apt_cache))}",
        ]
    return [*argv, os_plan.release, str(target), os_plan.mirror]


def bootstrap(os_plan: OSPlan, target: Path, apt_cache: Path | None) -> None:
    if apt_cache is not None:
        apt_cache.mkdir(parents=True, exist_ok=True)
    run(mmdebstrap_argv(os_plan, target, apt_cache))

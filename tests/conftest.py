"""Shared fixtures. Tiers: tests/unit (pure, fast), tests/integration (real builds),
tests/boot (QEMU). `make test` runs them all."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
FIXED_EPOCH = 1767225600  # 2026-01-01T00:00:00Z, for plans and reproducible builds


@pytest.fixture
def fixed_epoch(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(FIXED_EPOCH))
    return FIXED_EPOCH


def needs_root_tools() -> pytest.MarkDecorator:
    missing = [t for t in ("mmdebstrap", "qemu-system-x86_64", "sfdisk", "grub-mkimage")
               if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing) or os.geteuid() != 0,
                              reason=f"needs root and {', '.join(missing) or 'tools'}")

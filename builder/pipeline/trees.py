"""Trees shared between stages. A stored tree is never changed: a stage that changes a
tree gets it as the read-only lower layer of an overlay with an upper folder of its own
(kept as the stage's output: a few hundred KiB instead of ~9000 files), or, where overlays
cannot be used (not root, no overlayfs, a path overlayfs refuses), as a copy."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildFailed
from builder.host import overlay
from builder.pipeline.cache import copy_tree


@dataclass(frozen=True)
class Output:
    """A stage's output: a folder of files, a whole tree, or a tree's upper layer over
    ``lower``."""

    path: Path
    lower: Output | None = None
    tree: bool = False

    def layers(self) -> list[Path]:
        """Topmost first."""
        return [self.path, *(self.lower.layers() if self.lower else [])]


class Trees:
    def __init__(self, workspace: Path, held: contextlib.ExitStack):
        self.workspace, self.held = workspace, held
        self._writable = contextlib.ExitStack()
        held.callback(self._writable.close)

    def layers_usable(self, *paths: Path) -> bool:
        return overlay.usable(self.workspace, *paths)

    def writable(self, target: Path, layers: list[Path]) -> Path | None:
        """Show ``layers`` at ``target`` for changing: an overlay whose upper folder is
        returned, or (None) a copy of the single tree."""
        upper, work = target.with_name(f"{target.name}-upper"), \
            target.with_name(f"{target.name}-work")
        if overlay.try_mount(self._writable, target, layers, upper, work):
            return upper
        if len(layers) > 1:
            raise BuildFailed("cannot mount a layered tree here; run with --no-cache")
        for folder in (target, upper, work):  # made empty for a mount that then failed
            with contextlib.suppress(FileNotFoundError):
                folder.rmdir()
        copy_tree(layers[0], target)
        return None

    def release(self) -> None:
        """Unmount the writable trees (their upper folders keep the changes)."""
        self._writable.close()

    def readonly(self, target: Path, layers: list[Path]) -> Path:
        """A read-only view of a layered tree at ``target`` (mounted once per build)."""
        if target.is_dir() and any(target.iterdir()):
            return target
        if not overlay.try_mount(self.held, target, layers):
            raise BuildFailed("cannot mount a layered tree here; run with --no-cache")
        return target

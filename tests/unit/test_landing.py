"""Results land in the output directory all the way once they start: an interrupt then is
noted and the build finishes; an earlier output is swapped out, never deleted first."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from builder.host.workspace import land, signals_deferred


def test_signals_are_deferred_while_landing() -> None:
    with signals_deferred() as arrived:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    assert arrived == [signal.SIGINT, signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_land_swaps_earlier_outputs_into_the_workspace(tmp_path: Path) -> None:
    out, ws = tmp_path / "out", tmp_path / "out/.amiforge-tmp-x"
    ws.mkdir(parents=True)
    (out / "disk.raw").write_text("old image")
    (ws / "disk.raw").write_text("new image")
    (ws / "register-image.json").write_text("{}")
    old_inode = (out / "disk.raw").stat().st_ino
    land({ws / "disk.raw": "disk.raw", ws / "register-image.json": "register-image.json"}, out)
    assert (out / "disk.raw").read_text() == "new image"
    assert (out / "register-image.json").read_text() == "{}"
    assert (ws / "disk.raw").stat().st_ino == old_inode  # the old one, until ws is removed

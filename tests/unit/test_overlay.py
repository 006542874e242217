"""Layered trees: mount options and when overlays are not used."""

from __future__ import annotations

from pathlib import Path

from builder.host import overlay


def test_options_put_the_first_lower_layer_on_top() -> None:
    options = overlay.overlay_options([Path("/c/upper"), Path("/c/base")], Path("/w/u"),
                                      Path("/w/work"))
    assert options == "lowerdir=/c/upper:/c/base,upperdir=/w/u,workdir=/w/work"
    assert overlay.overlay_options([Path("/a")], None, None) == "lowerdir=/a"


def test_paths_overlayfs_cannot_take_fall_back_to_copies(monkeypatch) -> None:
    monkeypatch.setattr(overlay, "_private", True)
    assert overlay.usable(Path("/cache/amiforge"), Path("/out/.amiforge-tmp-x"))
    for bad in ("/a,b", "/a:b", "/a\\b"):
        assert not overlay.usable(Path("/cache"), Path(bad))
    monkeypatch.setattr(overlay, "_private", False)  # no private mount namespace
    assert not overlay.usable(Path("/cache"))

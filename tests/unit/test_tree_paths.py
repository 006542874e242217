"""Paths inside a tree stay inside it: absolute links are re-rooted, ``..`` is clamped, and
nothing amiforge writes, removes or reads in a tree reaches the host through a link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.errors import BuildFailed
from builder.host import treepath
from builder.recipe.model import FileSpec
from builder.stages.configure import install_file, scrub, write_system_files


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry below ``folder`` with its mode, mtime and content."""
    out = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(top, name)
            info = path.lstat()
            data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
            out[str(path.relative_to(folder))] = (info.st_mode, info.st_mtime_ns, data)
    return out


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A host folder that a hostile tree points at; it must never change."""
    folder = tmp_path / "host-sentinel"
    (folder / "keep").mkdir(parents=True)
    (folder / "keep" / "file").write_text("host data\n")
    (folder / "machine-id").write_text("host machine id\n")
    os.utime(folder / "keep" / "file", (1_000_000, 1_000_000))
    return folder


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\n")
    return root


def test_absolute_links_are_rerooted(tree: Path, sentinel: Path) -> None:
    (tree / "var").mkdir()
    (tree / "var/run").symlink_to(str(sentinel))
    assert treepath.in_root(tree, "/var/run/x") == tree / str(sentinel).lstrip("/") / "x"


def test_dotdot_is_clamped_at_the_root(tree: Path) -> None:
    (tree / "up").symlink_to("../../../../etc")
    assert treepath.in_root(tree, "/up/passwd") == tree / "etc/passwd"
    assert treepath.in_root(tree, "/../../etc/passwd") == tree / "etc/passwd"


def test_link_loops_are_an_error(tree: Path) -> None:
    (tree / "a").symlink_to("b")
    (tree / "b").symlink_to("a")
    with pytest.raises(BuildFailed, match="too many levels"):
        treepath.in_root(tree, "/a/x")


def test_recipe_file_through_var_run_stays_in_the_tree(tree: Path, sentinel: Path) -> None:
    (tree / "var").mkdir()
    (tree / "var/run").symlink_to(str(sentinel))  # as Debian's var/run -> /run
    before = snapshot(sentinel)
    install_file(tree, FileSpec(dest="/var/run/keep/file", content="from the recipe\n",
                                mode="0600"), None)
    assert snapshot(sentinel) == before
    written = tree / str(sentinel).lstrip("/") / "keep/file"
    assert written.read_text() == "from the recipe\n"
    assert written.stat().st_mode & 0o777 == 0o600


def test_recipe_file_onto_a_link_is_refused(tree: Path, sentinel: Path) -> None:
    (tree / "etc/motd").symlink_to(str(sentinel / "keep/file"))
    before = snapshot(sentinel)
    with pytest.raises(BuildFailed, match="symlink"):
        install_file(tree, FileSpec(dest="/etc/motd", content="x"), None)
    assert snapshot(sentinel) == before


def test_scrub_empties_the_images_tmp_not_the_hosts(tree: Path, sentinel: Path) -> None:
    (tree / "var").mkdir()
    (tree / "var/tmp").symlink_to(str(sentinel))        # a script's `ln -s /tmp /var/tmp`
    (tree / "etc/machine-id").symlink_to(str(sentinel / "machine-id"))
    (tree / "root").symlink_to(str(sentinel))
    before = snapshot(sentinel)
    scrub(tree)
    assert snapshot(sentinel) == before
    machine_id = tree / "etc/machine-id"
    assert not machine_id.is_symlink() and machine_id.read_text() == ""


def test_system_files_replace_links_in_the_tree(tree: Path, sentinel: Path) -> None:
    from builder.plan import make_plan
    from builder.recipe.load import load_recipe
    from tests.conftest import RECIPES

    plan = make_plan(load_recipe(RECIPES / "debian-12-ebs.yaml"))
    (tree / "etc/hostname").symlink_to(str(sentinel / "keep/file"))
    (tree / "srv").symlink_to(str(sentinel))  # the data volume's mount point is below it
    (tree / "boot").symlink_to("/")
    before = snapshot(sentinel)
    write_system_files(plan, tree)
    assert snapshot(sentinel) == before
    assert (tree / "etc/hostname").read_text() == plan.hostname + "\n"
    assert (tree / "grub/grub.cfg").is_file()  # boot -> / re-rooted: the tree's own root


def test_package_list_is_read_inside_the_tree(tree: Path) -> None:
    """A script's `var/lib/dpkg -> /proc/self/root/var/lib/dpkg` must not make amiforge
    list the build host's packages (a host tool given the tree's path would follow it)."""
    from builder.outputs.manifest import installed_packages

    (tree / "var/lib").mkdir(parents=True)
    (tree / "var/lib/dpkg").symlink_to("/proc/self/root/var/lib/dpkg")
    with pytest.raises(BuildFailed, match="cannot read"):
        installed_packages(tree)
    (tree / "var/lib/dpkg").unlink()
    (tree / "var/lib/dpkg").mkdir()
    (tree / "var/lib/dpkg/status").write_text(
        "Package: a\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.0\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 2\n\n"
        "Package: b\nStatus: install ok installed\nMulti-Arch: same\nArchitecture: arm64\n"
        "Version: 2:3.4-1\nDescription: two\n lines\n")
    assert installed_packages(tree) == [
        {"name": "a", "version": "1.0", "architecture": "amd64"},
        {"name": "b", "version": "2:3.4-1", "architecture": "arm64"}]


def test_malformed_passwd_entry_is_a_build_error(tree: Path) -> None:
    (tree / "etc/passwd").write_text("root:x:zero:0:root:/root:/bin/bash\n")
    with pytest.raises(BuildFailed, match="malformed entry for 'root'"):
        install_file(tree, FileSpec(dest="/etc/x", content="x"), None)


def test_a_source_changed_since_the_plan_fails_the_copy(tmp_path: Path) -> None:
    """The plan and the cache key hold a source's sha256; the bytes copied must be those."""
    import hashlib

    tree, source = tmp_path / "tree", tmp_path / "motd"
    tree.mkdir()
    source.write_text("planned\n")
    planned = hashlib.sha256(b"planned\n").hexdigest()
    treepath.copy_in(tree, source, "/etc/motd", 0o644, sha256=planned)
    assert (tree / "etc/motd").read_text() == "planned\n"
    source.write_text("swapped after the plan\n")
    with pytest.raises(BuildFailed, match="changed while the image was being built"):
        treepath.copy_in(tree, source, "/etc/issue", 0o644, sha256=planned)

"""The shared download cache: a build reads a private copy and adds its new packages whole,
so builds running at once never see a package half-written (CI: a bootstrap's sync-in
failed while another build's sync-out wrote into the same folder)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from builder.host.downloads import private_copy, publish


def test_a_build_reads_a_private_copy_of_the_packages_only(tmp_path: Path) -> None:
    shared = tmp_path / "apt-archives"
    (shared / "partial").mkdir(parents=True)
    (shared / "a_1_arm64.deb").write_bytes(b"a")
    (shared / "lock").write_bytes(b"")
    (shared / "evil.deb").symlink_to("/etc/shadow")
    private_copy(shared, tmp_path / "mine")
    assert sorted(os.listdir(tmp_path / "mine")) == ["a_1_arm64.deb"]
    assert (tmp_path / "mine/a_1_arm64.deb").read_bytes() == b"a"


def test_publish_adds_only_what_the_shared_folder_lacks(tmp_path: Path) -> None:
    shared, mine = tmp_path / "apt-archives", tmp_path / "mine"
    shared.mkdir()
    (shared / "a_1_all.deb").write_bytes(b"theirs")
    private_copy(shared, mine)
    (mine / "b_2_all.deb").write_bytes(b"new")
    (mine / "lock").write_bytes(b"")
    (mine / "partial").mkdir()
    assert publish(mine, shared) == ["b_2_all.deb"]
    assert (shared / "b_2_all.deb").read_bytes() == b"new"
    assert (shared / "a_1_all.deb").read_bytes() == b"theirs"
    assert sorted(os.listdir(shared)) == ["a_1_all.deb", "b_2_all.deb"]  # no .part left


def test_publish_through_a_link_writes_into_the_folder_it_names(tmp_path: Path) -> None:
    real = tmp_path / "home-cache/apt-archives"
    real.mkdir(parents=True)
    (tmp_path / "suite").mkdir()
    link = tmp_path / "suite/apt-archives"
    link.symlink_to(real)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/c_3_all.deb").write_bytes(b"c")
    publish(tmp_path / "mine", link)
    assert (real / "c_3_all.deb").read_bytes() == b"c"
    assert os.listdir(tmp_path / "home-cache") == ["apt-archives"]


def test_publish_follows_no_link_planted_where_it_writes(tmp_path: Path) -> None:
    shared, mine = tmp_path / "apt-archives", tmp_path / "mine"
    shared.mkdir()
    mine.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    victim.chmod(0o600)
    for pid in range(os.getpid() - 2, os.getpid() + 3):  # the old, guessable names
        (shared / f"d_4_all.deb.{pid}").symlink_to(victim)
    (mine / "d_4_all.deb").write_bytes(b"d")
    assert publish(mine, shared) == ["d_4_all.deb"]
    assert victim.read_bytes() == b"keep" and victim.stat().st_mode & 0o777 == 0o600
    assert (shared / "d_4_all.deb").stat().st_mode & 0o777 == 0o644


def test_a_copy_taken_while_another_build_publishes_holds_only_whole_packages(
        tmp_path: Path) -> None:
    shared, theirs = tmp_path / "apt-archives", tmp_path / "theirs"
    shared.mkdir()
    theirs.mkdir()
    whole = os.urandom(1 << 20)
    for index in range(40):
        (theirs / f"p{index}_1_all.deb").write_bytes(whole)
    writer = threading.Thread(target=publish, args=(theirs, shared))
    writer.start()
    copies = 0
    while writer.is_alive() or copies == 0:
        mine = tmp_path / f"mine{copies}"
        private_copy(shared, mine)
        assert all(p.read_bytes() == whole for p in mine.iterdir())
        copies += 1
    writer.join()
    assert len(os.listdir(shared)) == 40

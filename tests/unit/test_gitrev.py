"""The recipe repository's commit, read from .git's files without running git there."""

from __future__ import annotations

import subprocess
from pathlib import Path

from builder.host.gitrev import checked_out_commit


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def make_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "recipes").mkdir()
    (path / "recipes/r.yaml").write_text("name: x\n")
    git(path, "add", ".")
    git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return path


def test_loose_packed_detached_and_worktree_heads(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD")
    assert checked_out_commit(repo / "recipes/r.yaml") == head
    git(repo, "pack-refs", "--all")
    assert not (repo / ".git/refs/heads/main").exists()
    assert checked_out_commit(repo / "recipes/r.yaml") == head
    git(repo, "worktree", "add", "-q", "--detach", str(tmp_path / "wt"))
    assert checked_out_commit(tmp_path / "wt/recipes/r.yaml") == head
    git(repo, "checkout", "-q", "--detach")
    assert checked_out_commit(repo / "recipes/r.yaml") == head


def test_outside_a_repository_or_hostile_heads_give_none(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain/r.yaml").write_text("name: x\n")
    assert checked_out_commit(tmp_path / "plain/r.yaml") is None
    repo = make_repo(tmp_path / "repo")
    for head in ("ref: ../../../etc/passwd", "ref: refs/../../config", "garbage",
                 "ref: refs/heads/missing"):
        (repo / ".git/HEAD").write_text(head + "\n")
        assert checked_out_commit(repo / "recipes/r.yaml") is None, head

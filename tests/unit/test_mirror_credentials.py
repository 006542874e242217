"""A mirror's credentials reach apt during the build and nothing else: not the plan, the
cache keys, the image's apt sources, the tool argument lists or the -v log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from builder.host import aptauth
from builder.host.chroot import prepared_root
from builder.host.run import run
from builder.plan import make_plan
from builder.recipe.load import load_recipe
from builder.stages.bootstrap import mmdebstrap_argv
from builder.templates import render_template

TOKEN = "s3cr3t-t0ken"
MIRROR = f"https://ci-user:{TOKEN}@apt.example.com:8443/debian"


@pytest.fixture
def plan(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: private-mirror\nos: {{mirror: \"{MIRROR}\"}}\n")
    return make_plan(load_recipe(recipe))


def test_split_credentials() -> None:
    public, auth = aptauth.split_credentials(MIRROR)
    assert public == "https://apt.example.com:8443/debian"
    assert auth == f"machine apt.example.com:8443/debian login ci-user password {TOKEN}\n"
    assert aptauth.split_credentials("http://deb.debian.org/debian") == (
        "http://deb.debian.org/debian", None)


def test_plan_and_outputs_hold_no_credentials(plan, tmp_path: Path) -> None:
    assert plan.os.mirror == "https://apt.example.com:8443/debian"
    assert TOKEN not in repr(plan) and TOKEN not in str(plan.to_dict())
    sources = render_template("apt-sources.j2", os=plan.os)
    assert "URIs: https://apt.example.com:8443/debian" in sources and TOKEN not in sources
    auth = tmp_path / "auth.conf"
    argv = mmdebstrap_argv(plan.os, tmp_path / "tree", None, None, auth)
    assert TOKEN not in " ".join(argv)
    assert f"--setup-hook=upload {auth} {aptauth.AUTH_FILE}" in argv
    assert f"--customize-hook=rm -f \"$1\"{aptauth.AUTH_FILE}" in argv


def test_the_verbose_log_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="amiforge.run"):
        run(["true", MIRROR])
    assert "https://***@apt.example.com:8443/debian" in caplog.text
    assert TOKEN not in caplog.text


def test_credentials_exist_in_the_tree_only_while_apt_runs(plan, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "usr/sbin").mkdir(parents=True)
    auth = tree / aptauth.AUTH_FILE.lstrip("/")
    with prepared_root(tree, plan.os.apt_auth):
        assert TOKEN in auth.read_text() and auth.stat().st_mode & 0o777 == 0o600
    assert not auth.exists()

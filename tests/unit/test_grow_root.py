"""Growing the root into its volume: the plan's packages per release, fstab's growfs option
on / alone, and repart's entry for the architecture's root partition type."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.plan import make_plan
from builder.recipe.load import LoadOptions, load_recipe
from builder.stages.configure import REPART_ROOT_TYPES
from builder.templates import render_template
from tests.conftest import FIXED_EPOCH

pytestmark = pytest.mark.unit


def plan_of(tmp_path: Path, text: str):
    (tmp_path / "r.yaml").write_text("name: grow-test\n" + text)
    return make_plan(load_recipe(tmp_path / "r.yaml",
                                 LoadOptions(source_date_epoch=FIXED_EPOCH)))


@pytest.mark.parametrize(("release", "packages"), [("trixie", {"systemd-repart"}),
                                                   ("bookworm", set())])
def test_repart_comes_from_where_the_release_keeps_it(tmp_path: Path, release: str,
                                                      packages: set[str]) -> None:
    plan = plan_of(tmp_path, f"os: {{release: {release}}}\n")
    assert plan.grow_root
    assert {"systemd-repart"} & set(plan.os.packages) == packages
    kept = plan_of(tmp_path, f"os: {{release: {release}}}\nroot_volume: {{grow: false}}\n")
    assert not kept.grow_root and "systemd-repart" not in kept.os.packages


def test_fstab_grows_the_root_filesystem_only(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, "block_device_mappings:\n"
                   "  - {device: /dev/xvda, root: true, ebs: {volume_size: 8}}\n"
                   "  - device: /dev/sdf\n    ebs: {volume_size: 1, content: "
                   "{filesystem: ext4, label: data, mount_point: /srv/data}}\n"
                   "ami: {backing: ebs}\n")
    lines = render_template("fstab.j2", plan=plan, esp=plan.partition("esp"),
                            volumes=plan.data_volumes).splitlines()
    growing = [line.split()[1] for line in lines if "x-systemd.growfs" in line]
    assert growing == ["/"]
    kept = plan_of(tmp_path, "root_volume: {grow: false}\n")
    assert "growfs" not in render_template("fstab.j2", plan=kept, esp=None, volumes=())


@pytest.mark.parametrize(("arch", "type_name"), [("x86_64", "root-x86-64"),
                                                 ("arm64", "root-arm64")])
def test_repart_matches_the_root_partition_type_of_the_architecture(
        arch: str, type_name: str) -> None:
    assert REPART_ROOT_TYPES[arch] == type_name
    text = render_template("repart-root.conf.j2", repart_type=type_name)
    assert f"[Partition]\nType={type_name}\n" in text

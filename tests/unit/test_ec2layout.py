"""`build boot OUTPUT_DIR --ec2` lays out the output's block device mapping as an instance
sees it: root as large as mapped, amiforge's EBS volumes, blank ones, instance store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.ec2layout import INSTANCE_STORE_SIZE, GiB, Volume, attach, mapping_layout
from builder.errors import InputError
from builder.host.run import qemu_img
from builder.vm import image_size

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "register-image"


def output_dir(tmp_path: Path, recipe: str = "debian-13-ebs") -> Path:
    out = tmp_path / "out"
    out.mkdir()
    golden = json.loads((GOLDEN / f"{recipe}.json").read_text())
    (out / "register-image.json").write_text(json.dumps(golden["register_image"]))
    for name in ("disk.qcow2", "volume-sdf.qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", str(out / name), "1M")
    return out


def test_the_ebs_recipe_is_laid_out_as_its_mapping(tmp_path: Path) -> None:
    out = output_dir(tmp_path)
    layout = mapping_layout(out)
    assert (layout.root, layout.root_size) == (out / "disk.qcow2", 8 * GiB)
    assert layout.volumes == (
        Volume("/dev/sdf", out / "volume-sdf.qcow2", GiB, "ebs", "ebs1"),
        Volume("/dev/sdb", None, INSTANCE_STORE_SIZE, "instance-store", "ephemeral0"))
    ebs, stores, devices = attach(layout, tmp_path)
    assert ebs == [out / "volume-sdf.qcow2"] and image_size(stores[0]) == INSTANCE_STORE_SIZE
    assert devices == (("ebs1", "sdf"), ("ephemeral0", "sdb"))


def test_a_mapped_image_name_cannot_lead_out_of_the_output(tmp_path: Path) -> None:
    out = output_dir(tmp_path)
    manifest = json.loads((out / "register-image.json").read_text())
    mapping = manifest["BlockDeviceMappings"][1]["Ebs"]
    mapping["SnapshotId"] = "REPLACE_WITH_SNAPSHOT_ID_OF_../../../etc/passwd"
    (out / "register-image.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"out: no passwd.qcow2 or passwd.raw to boot"):
        mapping_layout(out)


@pytest.mark.parametrize("text", ["[]", "3", "{", '{"BlockDeviceMappings": {"a": 1}}',
                                  '{"BlockDeviceMappings": ["x"]}',
                                  json.dumps({"BlockDeviceMappings": [{}] * 49})])
def test_a_broken_register_image_file_is_a_clear_error(tmp_path: Path, text: str) -> None:
    out = output_dir(tmp_path)
    (out / "register-image.json").write_text(text)
    with pytest.raises(InputError, match=r"register-image\.json"):
        mapping_layout(out)

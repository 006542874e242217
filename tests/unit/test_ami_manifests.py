"""RegisterImage and ModifyImageAttribute inputs: pinned by golden files and checked against
botocore's own model of the EC2 API (offline)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import botocore.session
import pytest
from botocore.validate import ParamValidator

from builder.outputs.ami import is_placeholder, launch_permission_input, register_image_input
from builder.plan import make_plan
from builder.recipe.load import LoadOptions, load_recipe
from tests.conftest import FIXED_EPOCH, RECIPES

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "register-image"
SHIPPED = sorted(p.name for p in RECIPES.glob("*.yaml"))
EC2 = botocore.session.get_session().get_service_model("ec2")


def plan_of(recipe: str):
    return make_plan(load_recipe(RECIPES / recipe, LoadOptions(source_date_epoch=FIXED_EPOCH)))


def requests_of(plan) -> tuple[dict, dict | None]:
    return register_image_input(plan.ami, plan.arch), launch_permission_input(plan.ami)


def with_snapshot_ids(request: dict) -> dict:
    filled = copy.deepcopy(request)
    for i, mapping in enumerate(filled.get("BlockDeviceMappings", [])):
        ebs = mapping.get("Ebs", {})
        if is_placeholder(ebs.get("SnapshotId", "x")):
            ebs["SnapshotId"] = f"snap-0123456789abcdef{i}"
    if is_placeholder(filled.get("ImageLocation", "x")):
        filled["ImageLocation"] = "my-bucket/image.manifest.xml"
    return filled


def validate(operation: str, params: dict) -> str:
    report = ParamValidator().validate(params, EC2.operation_model(operation).input_shape)
    return report.generate_report() if report.has_errors() else ""


@pytest.mark.parametrize("recipe", SHIPPED)
def test_register_image_passes_botocore_validation(recipe: str) -> None:
    register, permission = requests_of(plan_of(recipe))
    assert validate("RegisterImage", with_snapshot_ids(register)) == ""
    if permission is not None:
        assert validate("ModifyImageAttribute", permission) == ""


@pytest.mark.parametrize("recipe", SHIPPED)
def test_register_image_matches_golden(recipe: str) -> None:
    register, permission = requests_of(plan_of(recipe))
    data = {"register_image": register, "launch_permission": permission}
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    golden = GOLDEN / (Path(recipe).stem + ".json")
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


def test_ebs_recipe_shape() -> None:
    request = requests_of(plan_of("debian-12-ebs.yaml"))[0]
    assert request["Architecture"] == "x86_64"
    assert request["VirtualizationType"] == "hvm"
    assert request["RootDeviceName"] == "/dev/xvda"
    assert request["BootMode"] == "uefi-preferred"
    devices = {m["DeviceName"]: m for m in request["BlockDeviceMappings"]}
    assert devices["/dev/xvda"]["Ebs"]["SnapshotId"] == "REPLACE_WITH_SNAPSHOT_ID_OF_disk.raw"
    assert devices["/dev/sdf"]["Ebs"]["SnapshotId"] == \
        "REPLACE_WITH_SNAPSHOT_ID_OF_volume-sdf.raw"
    # encryption belongs to the snapshot (publish encrypts it): AWS refuses Encrypted next
    # to SnapshotId
    assert "Encrypted" not in devices["/dev/sdf"]["Ebs"]
    assert devices["/dev/sdb"] == {"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"}
    assert request["TagSpecifications"] == [{"ResourceType": "image", "Tags": [
        {"Key": "os", "Value": "debian-12"}, {"Key": "team", "Value": "platform"}]}]


def test_instance_store_shape() -> None:
    request = requests_of(plan_of("debian-12-instance-store.yaml"))[0]
    assert request["RootDeviceName"] == "/dev/sda1"
    assert request["BootMode"] == "legacy-bios"
    assert request["ImageLocation"].endswith("image.manifest.xml")
    assert all("Ebs" not in m for m in request["BlockDeviceMappings"])


def test_default_root_mapping_is_as_large_as_the_image(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("name: xyz\nroot_volume: {size: 3GiB}\n")
    register, permission = requests_of(make_plan(load_recipe(tmp_path / "r.yaml")))
    [root] = register["BlockDeviceMappings"]
    assert root["DeviceName"] == "/dev/xvda"
    assert root["Ebs"]["VolumeSize"] == 3 and root["Ebs"]["VolumeType"] == "gp3"
    assert permission is None


def test_public_and_organizations(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "name: xyz\nami:\n  launch_permissions:\n    public: true\n"
        "    organization_arns:\n"
        "      ['arn:aws:organizations::123456789012:organization/o-abcdef1234']\n")
    _, permission = requests_of(make_plan(load_recipe(tmp_path / "r.yaml")))
    assert permission["LaunchPermission"]["Add"] == [
        {"Group": "all"},
        {"OrganizationArn": "arn:aws:organizations::123456789012:organization/o-abcdef1234"}]
    assert validate("ModifyImageAttribute", permission) == ""


def test_snapshots_and_register_image_name_the_same_images() -> None:
    """One typed plan makes both: every snapshot placeholder RegisterImage holds is a row of
    snapshots.json, with the volume size RegisterImage asks for."""
    from builder.outputs.ami import snapshots_input

    plan = plan_of("debian-12-ebs.yaml")
    register, _ = requests_of(plan)
    raw = {name: {"virtual_size": 1 << 30, "sha256": "0" * 64}
           for name in ("disk.raw", "volume-sdf.raw")}
    rows = snapshots_input(plan.ami, raw)["snapshots"]
    placeholders = {m["Ebs"]["SnapshotId"]: m for m in register["BlockDeviceMappings"]
                    if is_placeholder(m.get("Ebs", {}).get("SnapshotId", ""))}
    assert sorted(r["placeholder"] for r in rows) == sorted(placeholders)
    for row in rows:
        mapping = placeholders[row["placeholder"]]
        assert (row["device"], row["volume_size_gib"]) == (
            mapping["DeviceName"], mapping["Ebs"]["VolumeSize"])
    assert [r["image"] for r in rows] == ["disk.raw", "volume-sdf.raw"]


def test_bundle_mapping_lists_the_instance_store_volumes_in_bundle_order(
        tmp_path: Path) -> None:
    from builder.outputs.ami import bundle_mappings

    (tmp_path / "r.yaml").write_text(
        "name: xyz\nami: {backing: instance-store}\nblock_device_mappings:\n"
        "  - {device: /dev/sdc, virtual_name: ephemeral10}\n"
        "  - {device: /dev/sdb, virtual_name: ephemeral2}\n")
    plan = make_plan(load_recipe(tmp_path / "r.yaml"))
    assert bundle_mappings(plan.ami) == [("ami", "sda1"), ("root", "/dev/sda1"),
                                         ("ephemeral2", "sdb"), ("ephemeral10", "sdc")]
    assert plan.ami.snapshot_devices == ()


def test_no_snapshot_mapping_carries_encryption_fields(tmp_path: Path) -> None:
    """EbsBlockDevice: with a SnapshotId, Encrypted must be omitted; KmsKeyId is never
    RegisterImage's (RunInstances only). An empty volume may ask for encryption."""
    from builder.errors import RecipeError
    from builder.outputs.ami import snapshots_input

    (tmp_path / "r.yaml").write_text(
        "name: xyz\nblock_device_mappings:\n"
        "  - {device: /dev/xvda, root: true, ebs: {encrypted: true, kms_key_id: alias/k}}\n"
        "  - {device: /dev/sdg, ebs: {volume_size: 4, encrypted: true}}\n")
    plan = make_plan(load_recipe(tmp_path / "r.yaml"))
    register, _ = requests_of(plan)
    devices = {m["DeviceName"]: m["Ebs"] for m in register["BlockDeviceMappings"]}
    assert "Encrypted" not in devices["/dev/xvda"] and "KmsKeyId" not in devices["/dev/xvda"]
    assert devices["/dev/sdg"]["Encrypted"] is True and "KmsKeyId" not in devices["/dev/sdg"]
    (tmp_path / "k.yaml").write_text(
        "name: xyz\nblock_device_mappings:\n"
        "  - {device: /dev/sdg, ebs: {volume_size: 4, kms_key_id: alias/k}}\n")
    with pytest.raises(RecipeError, match="RegisterImage takes no KmsKeyId"):
        load_recipe(tmp_path / "k.yaml")
    [root] = snapshots_input(plan.ami, {"disk.raw": {"virtual_size": 1, "sha256": ""}})[
        "snapshots"]
    assert (root["encrypted"], root["kms_key_id"]) == (True, "alias/k")


@pytest.mark.parametrize(("permissions", "message"), [
    ("{public: true}", "cannot|does not let AMIs with encrypted snapshots be public"),
    ("{accounts: ['123456789012']}", "customer managed key"),
])
def test_encrypted_amis_are_shared_only_as_aws_allows(tmp_path: Path, permissions: str,
                                                      message: str) -> None:
    from builder.errors import RecipeError

    (tmp_path / "r.yaml").write_text(
        f"name: xyz\nami: {{launch_permissions: {permissions}}}\nblock_device_mappings:\n"
        "  - {device: /dev/xvda, root: true, ebs: {encrypted: true}}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(tmp_path / "r.yaml")


def test_uefi_data_for_microsoft_keys_decodes_to_them() -> None:
    """{keys: microsoft} becomes a UefiData blob that virt-firmware reads back to
    Microsoft's PK, KEKs and db (with the CA that signs Debian's shim); the same bytes
    every time; RegisterImage's limit holds."""
    import base64

    from builder.outputs.uefivars import decoded, microsoft_keys

    blob = microsoft_keys()
    assert blob == microsoft_keys() and len(blob) <= 64000
    base64.b64decode(blob, validate=True)
    variables = decoded(blob)
    assert set(variables) == {"PK", "KEK", "db", "dbx"}
    assert variables["PK"] == ["CN=Windows OEM Devices PK,O=Microsoft Corporation,"
                               "L=Redmond,ST=Washington,C=US"]
    assert any("KEK CA 2011" in s for s in variables["KEK"])
    assert any("UEFI CA 2011" in s for s in variables["db"])  # Debian's shim's signer


def test_the_secure_boot_recipe_registers_with_its_uefi_data() -> None:
    from builder.outputs.uefivars import microsoft_keys

    plan = make_plan(load_recipe(RECIPES / "debian-13-secureboot.yaml",
                                 LoadOptions(source_date_epoch=FIXED_EPOCH)))
    request = register_image_input(plan.ami, plan.arch)
    assert request["UefiData"] == microsoft_keys() and request["BootMode"] == "uefi"
    assert plan.ami.uefi_variables is not None and "PK" in plan.ami.uefi_variables
    model = botocore.session.get_session().get_service_model("ec2")
    report = ParamValidator().validate(request, model.operation_model("RegisterImage")
                                       .input_shape)
    assert not report.has_errors(), report.generate_report()

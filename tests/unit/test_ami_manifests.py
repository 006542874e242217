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

from builder.errors import RecipeError
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


def certificate(path: Path, name: str, der: bool = False) -> None:
    """A self-signed X.509 certificate (what `openssl req -x509` makes for PK, KEK, db)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(when)
            .not_valid_after(when + datetime.timedelta(days=3650)).sign(key, hashes.SHA256()))
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    path.write_bytes(cert.public_bytes(encoding))


CERTIFICATES_RECIPE = """name: own-keys
root_volume: {boot: uefi, secure_boot: true}
ami:
  boot_mode: uefi
  uefi_data:
    certificates:
      pk: keys/pk.pem
      kek: [keys/kek.pem]
      db: [keys/db.pem, keys/db2.der, keys/shim-signer.der]
      dbx: [keys/revoked.pem]
"""


def own_keys(keys: Path) -> None:
    """The certificates CERTIFICATES_RECIPE names: the user's own, and the one that signed
    Debian's shim (without which db refuses it)."""
    from builder.outputs.uefivars import shim_signer

    keys.mkdir(parents=True)
    for name in ("pk", "kek", "db", "revoked"):
        certificate(keys / f"{name}.pem", f"my {name}")
    certificate(keys / "db2.der", "my db 2", der=True)
    (keys / "shim-signer.der").write_bytes(shim_signer())


def test_uefi_data_from_your_own_certificates(tmp_path: Path) -> None:
    """{certificates: ...} enrolls the recipe's certificates (PEM or DER) in PK, KEK, db
    and dbx; virt-firmware reads the blob back to them; botocore takes the request."""
    own_keys(tmp_path / "keys")
    (tmp_path / "r.yaml").write_text(CERTIFICATES_RECIPE)
    plan = make_plan(load_recipe(tmp_path / "r.yaml", LoadOptions(source_date_epoch=FIXED_EPOCH)))
    variables = plan.ami.uefi_variables
    assert variables is not None and variables.pop("db")[:2] == ["CN=my db", "CN=my db 2"]
    assert variables == {"PK": ["CN=my pk"], "KEK": ["CN=my kek"], "dbx": ["CN=my revoked"]}
    request = register_image_input(plan.ami, plan.arch)
    assert validate("RegisterImage", with_snapshot_ids(request)) == ""
    again = make_plan(load_recipe(tmp_path / "r.yaml", LoadOptions(source_date_epoch=1)))
    assert again.ami.uefi_data == plan.ami.uefi_data  # the same bytes: a reproducible AMI


def two_certificates(path: Path) -> None:
    certificate(path, "one")
    first = path.read_bytes()
    certificate(path, "two")
    path.write_bytes(first + path.read_bytes())


@pytest.mark.parametrize(("change", "message"), [
    (lambda keys: (keys / "db2.der").write_bytes(b"not a certificate"),
     r"r.yaml:9:\d+: ami.uefi_data.certificates.db\[1\]: keys/db2.der: not an X.509 "
     "certificate"),
    (lambda keys: (keys / "pk.pem").unlink(),
     r"r.yaml:7:\d+: ami.uefi_data.certificates.pk: 'keys/pk.pem' not found"),
    (lambda keys: two_certificates(keys / "kek.pem"),
     r"r.yaml:8:\d+: ami.uefi_data.certificates.kek\[0\]: .*more than one PEM block"),
    (lambda keys: certificate(keys / "shim-signer.der", "not Microsoft", der=True),
     r"r.yaml:9:\d+: ami.uefi_data.certificates.db: none is Microsoft Corporation UEFI CA "
     "2011's certificate"),
    (None,  # the recipe without secure_boot: amiforge's GRUB, refused
     r"r.yaml:6:\d+: ami.uefi_data: enrolls a platform key, so instances boot with Secure "
     "Boot enforced: needs root_volume.secure_boot"),
])
def test_uefi_certificates_that_cannot_work_are_refused_where_named(tmp_path: Path, change,
                                                                    message: str) -> None:
    own_keys(tmp_path / "keys")
    recipe = CERTIFICATES_RECIPE
    if change is None:
        recipe = recipe.replace("secure_boot: true", "secure_boot: false")
    else:
        change(tmp_path / "keys")
    (tmp_path / "r.yaml").write_text(recipe)
    with pytest.raises(RecipeError, match=message):
        load_recipe(tmp_path / "r.yaml")


def test_uefi_certificates_outside_the_recipe_folder_are_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "recipes"
    own_keys(recipe / "keys")
    certificate(tmp_path / "host.pem", "host")
    (recipe / "r.yaml").write_text(CERTIFICATES_RECIPE.replace("keys/kek.pem", "../host.pem"))
    with pytest.raises(RecipeError, match=r"certificates.kek\[0\]: '../host.pem' is a path "
                       "outside the recipe's folder"):
        load_recipe(recipe / "r.yaml")


def test_uefi_data_is_what_aws_own_tool_writes(tmp_path: Path) -> None:
    """The blob for {keys: microsoft} is byte for byte what AWS's documented command makes
    of the same signature lists (`uefivars -i none -o aws --PK PK.esl --KEK KEK.esl --db
    db.esl --dbx dbx.esl`, "Create the AWS binary blob"), and that tool reads it back."""
    import subprocess
    import sys

    from pyuefivars.aws import AWSUEFIVarStore
    from virt.firmware.efi import efivar

    from builder.outputs.uefivars import microsoft_keys

    variables = efivar.EfiVarList()
    variables.enroll_platform_microsoft()
    variables.add_microsoft_keys("all")
    options = []
    for name, flag in (("PK", "--PK"), ("KEK", "--KEK"), ("db", "--db"), ("dbx", "--dbx")):
        (tmp_path / f"{name}.esl").write_bytes(bytes(variables[name].data))
        options += [flag, str(tmp_path / f"{name}.esl")]
    tool = subprocess.run([sys.executable, "-c", "import pyuefivars; pyuefivars.main()",
                           "-i", "none", "-o", "aws", "-O", str(tmp_path / "blob"), *options],
                          capture_output=True, check=True, timeout=60)
    assert (tmp_path / "blob").read_bytes().decode() == microsoft_keys(), tool.stderr
    read = AWSUEFIVarStore(microsoft_keys().encode())
    assert [v.name for v in read.vars] == ["PK", "KEK", "db", "dbx"]
    assert all(v.attr == 0x27 and v.timestamp is None and v.digest is None for v in read.vars)

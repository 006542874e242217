"""What AWS takes to register the AMI: RegisterImage input (EBS-backed or instance-store),
the ModifyImageAttribute input for launch permissions, which image file becomes which
EBS snapshot, and what is done to the AMI once registered (deprecation, SSM parameters,
snapshot permissions). Shapes follow botocore's model of the EC2 API (checked by the tests)."""

from __future__ import annotations

import re
from typing import Any

from builder.amiplan import INSTANCE_STORE_ROOT, AmiPlan, BlockDevice, EbsSettings, short_device

SNAPSHOT_PLACEHOLDER = "REPLACE_WITH_SNAPSHOT_ID_OF_{image}"
IMAGE_ID_PLACEHOLDER = "REPLACE_WITH_IMAGE_ID"
IMAGE_LOCATION_PLACEHOLDER = "REPLACE_WITH_BUCKET/{prefix}.manifest.xml"
BUNDLE_PREFIX = "image"


def _ebs_shape(ebs: EbsSettings, snapshot: str | None) -> dict[str, Any]:
    shape: dict[str, Any] = {}
    if snapshot is not None:
        shape["SnapshotId"] = snapshot
    if ebs.size_gib is not None:
        shape["VolumeSize"] = ebs.size_gib
    shape["VolumeType"] = ebs.volume_type
    if ebs.iops is not None:
        shape["Iops"] = ebs.iops
    if ebs.throughput is not None:
        shape["Throughput"] = ebs.throughput
    shape["DeleteOnTermination"] = ebs.delete_on_termination
    # A mapping made from a snapshot takes its encryption from the snapshot: AWS refuses
    # Encrypted next to SnapshotId "regardless of the value", and KmsKeyId "is only
    # supported on BlockDeviceMapping objects called by RunInstances, RequestSpotFleet, and
    # RequestSpotInstances" (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/
    # API_EbsBlockDevice.html). publish encrypts the snapshot itself (StartSnapshot).
    if snapshot is None and ebs.encrypted is not None:
        shape["Encrypted"] = ebs.encrypted
    return shape


def _mapping(device: BlockDevice, snapshots: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"DeviceName": device.device}
    if device.ebs is not None:
        snapshot = None
        if device.image is not None:
            snapshot = snapshots.get(device.device) or snapshot_placeholder(device.image)
        entry["Ebs"] = _ebs_shape(device.ebs, snapshot)
    elif device.virtual_name is not None:
        entry["VirtualName"] = device.virtual_name
    else:
        entry["NoDevice"] = ""
    return entry


def _tags(tags: dict[str, str], resource: str) -> list[dict[str, Any]]:
    if not tags:
        return []
    return [{"ResourceType": resource, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


def register_image_input(ami: AmiPlan, arch: str, snapshots: dict[str, str] | None = None,
                         image_location: str | None = None) -> dict[str, Any]:
    """The RegisterImage request, as `aws ec2 register-image --cli-input-json` takes it.
    ``snapshots`` maps device -> snapshot id; volumes amiforge builds get a placeholder
    naming their image file until then."""
    request: dict[str, Any] = {
        "Name": ami.name,
        "Architecture": arch,
        "VirtualizationType": "hvm",
        "RootDeviceName": ami.root_device,
        "BootMode": ami.boot_mode,
        "EnaSupport": ami.ena_support,
    }
    if ami.description:
        request["Description"] = ami.description
    if ami.instance_store:
        request["ImageLocation"] = image_location or IMAGE_LOCATION_PLACEHOLDER.format(
            prefix=BUNDLE_PREFIX)
    mappings = [_mapping(d, snapshots or {}) for d in ami.block_devices]
    if mappings:
        request["BlockDeviceMappings"] = mappings
    optional = {"SriovNetSupport": ami.sriov_net_support, "TpmSupport": ami.tpm_support,
                "ImdsSupport": ami.imds_support, "UefiData": ami.uefi_data}
    request.update({k: v for k, v in optional.items() if v is not None})
    if ami.tags:  # RegisterImage tags only the image; publish tags the snapshots
        request["TagSpecifications"] = _tags(ami.tags, "image")
    return request


def snapshots_input(ami: AmiPlan, raw_images: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """snapshots.json: which image file becomes which device's snapshot. ``raw_images``
    maps an image file name to its manifest entry (virtual size, sha256)."""
    snapshots = []
    for device in ami.snapshot_devices:
        assert device.image is not None and device.ebs is not None
        image = raw_images[device.image]
        snapshots.append({"device": device.device,
                          "placeholder": snapshot_placeholder(device.image),
                          "image": device.image, "size": image["virtual_size"],
                          "sha256": image["sha256"], "volume_size_gib": device.ebs.size_gib,
                          "encrypted": bool(device.ebs.encrypted),
                          "kms_key_id": device.ebs.kms_key_id})
    return {"snapshots": snapshots}


def bundle_mappings(ami: AmiPlan) -> list[tuple[str, str]]:
    """The bundle manifest's (virtual, device) pairs: the AMI and root, then the
    instance-store volumes, in the order ec2-bundle-image writes them."""
    mappings = [("ami", "sda1"), ("root", INSTANCE_STORE_ROOT)]
    mappings += [(d.virtual_name, short_device(d.device)) for d in ami.block_devices
                 if d.virtual_name is not None]
    return sorted(mappings, key=lambda mapping: _virtual_rank(mapping[0]))


def _virtual_rank(virtual: str) -> tuple[int, int]:
    """ami, root, ephemeral0..23 (by number), swap."""
    fixed = {"ami": (0, 0), "root": (1, 0), "swap": (3, 0)}
    if virtual in fixed:
        return fixed[virtual]
    return (2, int(virtual.removeprefix("ephemeral")))


def launch_permission_input(ami: AmiPlan, image_id: str = IMAGE_ID_PLACEHOLDER
                            ) -> dict[str, Any] | None:
    """ModifyImageAttribute input that grants the recipe's launch permissions, or None when
    the image stays private."""
    permissions = ami.launch_permissions
    add: list[dict[str, str]] = []
    if permissions.public:
        add.append({"Group": "all"})
    add += [{"UserId": account} for account in permissions.accounts]
    add += [{"OrganizationArn": arn} for arn in permissions.organization_arns]
    add += [{"OrganizationalUnitArn": arn} for arn in permissions.organizational_unit_arns]
    if not add:
        return None
    return {"ImageId": image_id, "Attribute": "launchPermission",
            "LaunchPermission": {"Add": add}}


def distribution_input(ami: AmiPlan) -> dict[str, Any] | None:
    """What publish and copy do to an AMI after RegisterImage (distribution.json), or None
    when nothing: the days until its deprecation, the SSM parameters that get its id, and
    who may create volumes from its snapshots."""
    permissions = ami.launch_permissions
    sharing = {"accounts": list(permissions.accounts), "public": permissions.public}
    settings = {"deprecate_after_days": ami.deprecate_after_days,
                "ssm_parameters": list(ami.ssm_parameters),
                "share_snapshots": sharing if ami.share_snapshots else None}
    return settings if any(settings.values()) else None


def is_placeholder(value: str) -> bool:
    return bool(re.match(r"^REPLACE_WITH_", value))


def snapshot_placeholder(image: str) -> str:
    """What register-image.json holds for a snapshot only an upload can make."""
    return SNAPSHOT_PLACEHOLDER.format(image=image)

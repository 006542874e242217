"""What AWS takes to register the AMI: RegisterImage input (EBS-backed or instance-store),
the ModifyImageAttribute input for launch permissions, and which image file becomes which
EBS snapshot. Shapes follow botocore's model of the EC2 API (checked by the tests)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from builder.recipe.model import BlockDeviceMapping, Ebs, Recipe
from builder.recipe.rules import effective_boot_mode, image_gib

SNAPSHOT_PLACEHOLDER = "REPLACE_WITH_SNAPSHOT_ID_OF_{image}"
IMAGE_ID_PLACEHOLDER = "REPLACE_WITH_IMAGE_ID"
IMAGE_LOCATION_PLACEHOLDER = "REPLACE_WITH_BUCKET/{prefix}.manifest.xml"
INSTANCE_STORE_ROOT = "/dev/sda1"
BUNDLE_PREFIX = "image"


@dataclass(frozen=True)
class Volume:
    """An EBS volume whose content amiforge builds: the root disk or a data volume."""

    device: str
    image: str            # file name in the output directory, e.g. disk.raw, volume-sdf.raw
    volume_size_gib: int
    root: bool


def short_device(device: str) -> str:
    return device.removeprefix("/dev/")


def volume_image_name(device: str) -> str:
    return f"volume-{short_device(device)}.raw"


def root_mapping(recipe: Recipe) -> BlockDeviceMapping:
    """The recipe's root mapping, or the default: /dev/xvda, gp3, as large as the image."""
    for mapping in recipe.block_device_mappings:
        if mapping.root:
            return mapping
    return BlockDeviceMapping(device="/dev/xvda", root=True, ebs=Ebs())


def ebs_volumes(recipe: Recipe) -> list[Volume]:
    root = root_mapping(recipe)
    assert root.ebs is not None
    volumes = [Volume(root.device, "disk.raw", root.ebs.volume_size or image_gib(recipe), True)]
    for mapping in recipe.block_device_mappings:
        if mapping.ebs is not None and mapping.ebs.content is not None and not mapping.root:
            volumes.append(Volume(mapping.device, volume_image_name(mapping.device),
                                  int(mapping.ebs.volume_size or 1), False))
    return volumes


def _ebs_shape(ebs: Ebs, size: int | None, snapshot: str | None) -> dict[str, Any]:
    shape: dict[str, Any] = {}
    if snapshot is not None:
        shape["SnapshotId"] = snapshot
    if size is not None:
        shape["VolumeSize"] = size
    shape["VolumeType"] = ebs.volume_type
    if ebs.iops is not None:
        shape["Iops"] = ebs.iops
    if ebs.throughput is not None:
        shape["Throughput"] = ebs.throughput
    shape["DeleteOnTermination"] = ebs.delete_on_termination
    if ebs.encrypted is not None:
        shape["Encrypted"] = ebs.encrypted
    if ebs.kms_key_id:
        shape["KmsKeyId"] = ebs.kms_key_id
    return shape


def block_device_mappings(recipe: Recipe, snapshots: dict[str, str] | None = None
                          ) -> list[dict[str, Any]]:
    """RegisterImage's BlockDeviceMappings. ``snapshots`` maps device -> snapshot id;
    volumes amiforge builds get a placeholder naming their image file until then."""
    instance_store = recipe.ami.backing == "instance-store"
    built = {v.device: v for v in ([] if instance_store else ebs_volumes(recipe))}
    mappings = [] if instance_store else [root_mapping(recipe)]
    mappings += [m for m in recipe.block_device_mappings if not m.root]
    out = []
    for mapping in mappings:
        entry: dict[str, Any] = {"DeviceName": mapping.device}
        if mapping.ebs is not None:
            volume = built.get(mapping.device)
            snapshot = None
            if volume is not None:
                snapshot = (snapshots or {}).get(mapping.device) or \
                    snapshot_placeholder(volume.image)
            size = volume.volume_size_gib if volume else mapping.ebs.volume_size
            entry["Ebs"] = _ebs_shape(mapping.ebs, size, snapshot)
        elif mapping.virtual_name is not None:
            entry["VirtualName"] = mapping.virtual_name
        else:
            entry["NoDevice"] = ""
        out.append(entry)
    return out


def _tags(tags: dict[str, str], resource: str) -> list[dict[str, Any]]:
    if not tags:
        return []
    return [{"ResourceType": resource,
             "Tags": [{"Key": k, "Value": v} for k, v in sorted(tags.items())]}]


def register_image_input(recipe: Recipe, snapshots: dict[str, str] | None = None,
                         image_location: str | None = None) -> dict[str, Any]:
    """The RegisterImage request, as `aws ec2 register-image --cli-input-json` takes it."""
    ami = recipe.ami
    instance_store = ami.backing == "instance-store"
    request: dict[str, Any] = {
        "Name": ami.name or recipe.name,
        "Architecture": recipe.arch,
        "VirtualizationType": "hvm",
        "RootDeviceName": INSTANCE_STORE_ROOT if instance_store else root_mapping(recipe).device,
        "BootMode": effective_boot_mode(recipe),
        "EnaSupport": ami.ena_support,
    }
    description = ami.description if ami.description is not None else recipe.description
    if description:
        request["Description"] = description
    if instance_store:
        request["ImageLocation"] = image_location or IMAGE_LOCATION_PLACEHOLDER.format(
            prefix=BUNDLE_PREFIX)
    mappings = block_device_mappings(recipe, snapshots)
    if mappings:
        request["BlockDeviceMappings"] = mappings
    optional = {"SriovNetSupport": ami.sriov_net_support, "TpmSupport": ami.tpm_support,
                "ImdsSupport": ami.imds_support, "UefiData": ami.uefi_data}
    request.update({k: v for k, v in optional.items() if v is not None})
    if ami.tags:  # RegisterImage tags only the image; publish tags the snapshots
        request["TagSpecifications"] = _tags(ami.tags, "image")
    return request


def launch_permission_input(recipe: Recipe, image_id: str = IMAGE_ID_PLACEHOLDER
                            ) -> dict[str, Any] | None:
    """ModifyImageAttribute input that grants the recipe's launch permissions, or None when
    the image stays private."""
    permissions = recipe.ami.launch_permissions
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


def is_placeholder(value: str) -> bool:
    return bool(re.match(r"^REPLACE_WITH_", value))


def snapshot_placeholder(image: str) -> str:
    """What register-image.json holds for a snapshot only an upload can make."""
    return SNAPSHOT_PLACEHOLDER.format(image=image)


def placeholder_image(value: str) -> str | None:
    """The image file a snapshot placeholder names (None: not a snapshot placeholder)."""
    prefix, _, _ = SNAPSHOT_PLACEHOLDER.partition("{image}")
    return value.removeprefix(prefix) if value.startswith(prefix) else None

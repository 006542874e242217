"""The AMI part of the plan, typed: the image's settings and its block devices, each of one
kind (the root volume, a data volume amiforge builds, an empty EBS volume, an instance-store
volume, a suppressed device). Everything AWS is given is made from this by builder.outputs.ami:
register-image.json, snapshots.json, the bundle's block device mapping and
launch-permission.json; nothing parses those back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from builder.recipe.model import BlockDeviceMapping, Ebs, FileSpec, Recipe, UefiKeys
from builder.recipe.rules import effective_boot_mode, image_gib

GiB = 1 << 30
ROOT_IMAGE = "disk.raw"
DEFAULT_ROOT_DEVICE = "/dev/xvda"
INSTANCE_STORE_ROOT = "/dev/sda1"

DeviceKind = Literal["root", "data", "empty", "instance-store", "no-device"]


@dataclass(frozen=True)
class EbsSettings:
    """How AWS makes the volume: AWS's own fields, sizes in GiB."""

    volume_type: str
    size_gib: int | None
    iops: int | None = None
    throughput: int | None = None
    delete_on_termination: bool = True
    encrypted: bool | None = None
    kms_key_id: str | None = None


@dataclass(frozen=True)
class DataVolume:
    """The content of a data volume: a whole-disk filesystem image of its own."""

    device: str
    image: str
    size: int
    filesystem: str
    label: str
    mount_point: str
    fs_uuid: str
    files: tuple[FileSpec, ...]


@dataclass(frozen=True)
class BlockDevice:
    device: str
    kind: DeviceKind
    ebs: EbsSettings | None = None
    virtual_name: str | None = None       # instance-store: ephemeral0..23
    volume: DataVolume | None = None      # data: what amiforge puts on it

    @property
    def image(self) -> str | None:
        """The image file amiforge builds for this device (None: AWS makes it)."""
        if self.kind == "root":
            return ROOT_IMAGE
        return self.volume.image if self.volume else None


@dataclass(frozen=True)
class LaunchPermissions:
    public: bool = False
    accounts: tuple[str, ...] = ()
    organization_arns: tuple[str, ...] = ()
    organizational_unit_arns: tuple[str, ...] = ()


@dataclass(frozen=True)
class AmiPlan:
    name: str
    description: str
    backing: Literal["ebs", "instance-store"]
    root_device: str
    boot_mode: str
    ena_support: bool
    sriov_net_support: str | None
    tpm_support: str | None
    imds_support: str | None
    uefi_data: str | None = field(repr=False)
    tags: dict[str, str]
    launch_permissions: LaunchPermissions
    block_devices: tuple[BlockDevice, ...]
    share_snapshots: bool = False
    deprecate_after_days: int | None = None
    ssm_parameters: tuple[str, ...] = ()
    # uefi_data's Secure Boot variables, decoded: name -> certificate subjects (build plan)
    uefi_variables: dict[str, list[str]] | None = None

    @property
    def instance_store(self) -> bool:
        return self.backing == "instance-store"

    @property
    def data_volumes(self) -> tuple[DataVolume, ...]:
        return tuple(d.volume for d in self.block_devices if d.volume is not None)

    @property
    def snapshot_devices(self) -> tuple[BlockDevice, ...]:
        """The devices whose snapshot amiforge uploads (root and data volumes, EBS only)."""
        return tuple(d for d in self.block_devices if d.image is not None)


def short_device(device: str) -> str:
    return device.removeprefix("/dev/")


def volume_image_name(device: str) -> str:
    return f"volume-{short_device(device)}.raw"


def uefi_data_blob(value: Any, base_dir: Path) -> str | None:
    """RegisterImage's UefiData: the recipe's blob, or the one amiforge makes for its keys
    or certificates (paths relative to the recipe's folder)."""
    if value is None or isinstance(value, str):
        return value
    from builder.outputs.uefivars import certificate_store, microsoft_keys

    if isinstance(value, UefiKeys):
        return microsoft_keys()
    return certificate_store(value.certificates, base_dir)


def _variables(blob: str | None) -> dict[str, list[str]] | None:
    if blob is None:
        return None
    from builder.outputs.uefivars import decoded

    return decoded(blob)


def ami_plan(recipe: Recipe, fixed_uuid: Callable[[str], str], base_dir: Path) -> AmiPlan:
    """The typed AMI of ``recipe`` (whose files are relative to ``base_dir``);
    ``fixed_uuid(purpose)`` makes the data volumes' UUIDs."""
    ami, instance_store = recipe.ami, recipe.ami.backing == "instance-store"
    root = root_mapping(recipe)
    devices = [] if instance_store else [BlockDevice(
        root.device, "root", _ebs(root.ebs, root.ebs.volume_size or image_gib(recipe)))]
    devices += [_device(m, fixed_uuid) for m in recipe.block_device_mappings if not m.root]
    permissions = ami.launch_permissions
    blob = uefi_data_blob(ami.uefi_data, base_dir)
    return AmiPlan(
        name=ami.name or recipe.name,
        description=ami.description if ami.description is not None else recipe.description,
        backing=ami.backing,
        root_device=INSTANCE_STORE_ROOT if instance_store else root.device,
        boot_mode=effective_boot_mode(recipe), ena_support=ami.ena_support,
        sriov_net_support=ami.sriov_net_support, tpm_support=ami.tpm_support,
        imds_support=ami.imds_support, uefi_data=blob, uefi_variables=_variables(blob),
        tags=dict(sorted(ami.tags.items())),
        launch_permissions=LaunchPermissions(
            permissions.public, tuple(permissions.accounts),
            tuple(permissions.organization_arns), tuple(permissions.organizational_unit_arns)),
        block_devices=tuple(devices), share_snapshots=ami.share_snapshots,
        deprecate_after_days=int(ami.deprecate_after[:-1]) if ami.deprecate_after else None,
        ssm_parameters=tuple(ami.ssm_parameters))


def root_mapping(recipe: Recipe) -> BlockDeviceMapping:
    """The recipe's root mapping, or the default: /dev/xvda, gp3, as large as the image."""
    for mapping in recipe.block_device_mappings:
        if mapping.root:
            return mapping
    return BlockDeviceMapping(device=DEFAULT_ROOT_DEVICE, root=True, ebs=Ebs())


def _device(mapping: BlockDeviceMapping, fixed_uuid: Callable[[str], str]) -> BlockDevice:
    if mapping.virtual_name is not None:
        return BlockDevice(mapping.device, "instance-store", virtual_name=mapping.virtual_name)
    if mapping.ebs is None:
        return BlockDevice(mapping.device, "no-device")
    content = mapping.ebs.content
    if content is None:
        return BlockDevice(mapping.device, "empty", _ebs(mapping.ebs, mapping.ebs.volume_size))
    size_gib = int(mapping.ebs.volume_size or 1)
    volume = DataVolume(
        device=mapping.device, image=volume_image_name(mapping.device), size=size_gib * GiB,
        filesystem=content.filesystem, label=content.label,
        mount_point=content.mount_point or f"/mnt/{content.label}",
        fs_uuid=fixed_uuid(f"volume:{mapping.device}"), files=tuple(content.files))
    return BlockDevice(mapping.device, "data", _ebs(mapping.ebs, size_gib), volume=volume)


def _ebs(ebs: Ebs | None, size_gib: int | None) -> EbsSettings:
    assert ebs is not None
    return EbsSettings(ebs.volume_type, size_gib, ebs.iops, ebs.throughput,
                       ebs.delete_on_termination, ebs.encrypted, ebs.kms_key_id)

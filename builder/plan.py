"""The Plan: a recipe with every default resolved. Sizes are bytes, UUIDs are fixed (derived
from the recipe, so a plan and the images it makes are reproducible), the partition layout
and the package set are final. Every later stage reads the plan and nothing else."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from builder import ami, distros
from builder.host.aptauth import split_credentials
from builder.recipe.load import LoadedRecipe
from builder.recipe.model import FileSpec, Recipe, Script, User
from builder.recipe.sizes import ALIGN, BIOS_BOOT_SIZE, ESP_SIZE, MiB

GiB = 1 << 30

TYPE_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
TYPE_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
TYPE_ROOT = {"x86_64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
             "arm64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"}
NAMESPACE = uuid.UUID("6f0b7c1e-9a51-4c8e-9a7c-2d5f3b1a9e10")

DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)


@dataclass(frozen=True)
class Partition:
    number: int
    name: str
    type_guid: str
    start: int
    size: int
    uuid: str
    filesystem: str | None
    fs_uuid: str | None

# Drivers the initramfs needs to find the root disk on EC2 (Xen: xen-blkfront; Nitro: nvme,
# built into Debian's cloud kernel) and under QEMU (virtio, AHCI, PIIX), instead of
# initramfs-tools' MODULES=most: a third of the size, faster to build, load and unpack.
INITRAMFS_DRIVERS = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ahci", "ata_piix",
                     "xen_blkfront", "nvme")


@dataclass(frozen=True)
class OSPlan:
    distribution: str
    release: str
    mirror: str
    components: tuple[str, ...]
    architecture: str
    packages: tuple[str, ...]
    dpkg_options: tuple[str, ...] = DPKG_EXCLUDES
    initramfs_modules: tuple[str, ...] = INITRAMFS_DRIVERS
    # the mirror's credentials as an apt auth.conf entry: never shown, cached or imaged
    apt_auth: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class DataVolume:
    """An extra EBS volume with content: a whole-disk filesystem image of its own."""

    device: str
    image: str
    size: int
    filesystem: str
    label: str
    mount_point: str
    fs_uuid: str
    files: tuple[FileSpec, ...]


@dataclass(frozen=True)
class Plan:
    name: str
    description: str
    arch: str
    recipe_path: str
    source_date_epoch: int
    hostname: str
    os: OSPlan
    boot: str
    kernel_cmdline: tuple[str, ...]
    disk_size: int
    partitions: tuple[Partition, ...]
    root_filesystem: str
    root_label: str
    files: tuple[FileSpec, ...]
    users: tuple[User, ...]
    services_enable: tuple[str, ...]
    services_disable: tuple[str, ...]
    scripts: tuple[Script, ...]
    formats: tuple[str, ...]
    qcow2_compress: bool
    reproducible: bool = False
    data_volumes: tuple[DataVolume, ...] = ()
    backing: str = "ebs"
    ami: dict[str, Any] = field(default_factory=dict)
    register_image: dict[str, Any] = field(default_factory=dict)
    launch_permission: dict[str, Any] | None = None
    audit_allow: tuple[Any, ...] = ()

    @property
    def root(self) -> Partition:
        return self.partitions[-1]

    def partition(self, name: str) -> Partition | None:
        return next((p for p in self.partitions if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["os"]["apt_auth"]  # secret: not in plans, cache keys or manifests
        data["files"] = [f.model_dump(exclude_none=True) for f in self.files]
        data["users"] = [u.model_dump() for u in self.users]
        data["scripts"] = [s.model_dump(exclude_none=True) for s in self.scripts]
        data["audit_allow"] = [w.model_dump() for w in self.audit_allow]
        data["data_volumes"] = [
            {**asdict(v), "files": [f.model_dump(exclude_none=True) for f in v.files]}
            for v in self.data_volumes]
        return _sorted(data)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


def fixed_uuid(seed: str, purpose: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{seed}\0{purpose}"))


def align_up(value: int, alignment: int = ALIGN) -> int:
    return -(-value // alignment) * alignment


def _fs_uuid(seed: str, name: str, filesystem: str | None) -> str | None:
    if filesystem is None:
        return None
    value = fixed_uuid(seed, f"filesystem:{name}")
    if filesystem == "vfat":  # a FAT volume id: 8 hex digits, written XXXX-XXXX
        return f"{value[:4]}-{value[4:8]}".upper()
    return value


def layout(seed: str, arch: str, boot: str, disk_size: int, filesystem: str) -> list[Partition]:
    """GPT layout: BIOS boot (bios, hybrid), ESP (uefi, hybrid), root last so it can grow."""
    parts: list[Partition] = []
    offset = ALIGN

    def add(name: str, type_guid: str, size: int, fs: str | None) -> None:
        nonlocal offset
        parts.append(Partition(
            number=len(parts) + 1, name=name, type_guid=type_guid, start=offset, size=size,
            uuid=fixed_uuid(seed, f"partition:{name}"), filesystem=fs,
            fs_uuid=_fs_uuid(seed, name, fs)))
        offset += size

    if boot in ("bios", "hybrid"):
        add("bios-boot", TYPE_BIOS_BOOT, BIOS_BOOT_SIZE, None)
    if boot in ("uefi", "hybrid"):
        add("esp", TYPE_ESP, ESP_SIZE, "vfat")
    add("root", TYPE_ROOT[arch], disk_size - offset - ALIGN, filesystem)
    return parts


def packages_for(recipe: Recipe, distribution: type[distros.Distribution]) -> tuple[str, ...]:
    volume = recipe.root_volume
    wanted = [*distribution.base_packages,
              recipe.os.kernel or distribution.kernel_for(recipe.arch)]
    if any(user.sudo for user in volume.users):
        wanted.append("sudo")
    wanted += volume.packages
    return tuple(dict.fromkeys(wanted))


def make_plan(loaded: LoadedRecipe) -> Plan:
    recipe = loaded.recipe
    distribution = distros.get(recipe.os.distribution)
    volume = recipe.root_volume
    disk_size = align_up(volume.size)
    seed = f"{recipe.name}\0{loaded.path.stem}"
    partitions = layout(seed, recipe.arch, volume.boot, disk_size, volume.filesystem)
    mirror, apt_auth = split_credentials(recipe.os.mirror or distribution.default_mirror)
    os_plan = OSPlan(
        distribution=distribution.name,
        release=recipe.os.release or distribution.default_release,
        mirror=mirror,
        apt_auth=apt_auth,
        components=tuple(recipe.os.components or distribution.default_components),
        architecture=distribution.debian_arch(recipe.arch),
        packages=packages_for(recipe, distribution),
    )
    cmdline = ("ro", "console=tty0", "console=ttyS0,115200n8", *volume.kernel_cmdline)
    return Plan(
        name=recipe.name,
        description=recipe.description,
        arch=recipe.arch,
        recipe_path=loaded.path.name,
        source_date_epoch=loaded.build_time,
        reproducible=loaded.reproducible,
        hostname=volume.hostname,
        os=os_plan,
        boot=volume.boot,
        kernel_cmdline=cmdline,
        disk_size=disk_size,
        partitions=tuple(partitions),
        root_filesystem=volume.filesystem,
        root_label="root",
        files=tuple(volume.files),
        users=tuple(volume.users),
        services_enable=tuple(dict.fromkeys(volume.services.enable)),
        services_disable=tuple(dict.fromkeys(volume.services.disable)),
        scripts=tuple(volume.scripts),
        formats=tuple(dict.fromkeys(recipe.outputs.formats)),
        qcow2_compress=recipe.outputs.qcow2.compress,
        data_volumes=tuple(data_volumes(recipe, seed)),
        backing=recipe.ami.backing,
        ami=recipe.ami.model_dump(exclude={"bundle"}),
        register_image=ami.register_image_input(recipe),
        launch_permission=ami.launch_permission_input(recipe),
        audit_allow=tuple(recipe.audit.allow),
    )


def data_volumes(recipe: Recipe, seed: str) -> list[DataVolume]:
    out = []
    for mapping in recipe.block_device_mappings:
        content = mapping.ebs.content if mapping.ebs else None
        if mapping.root or content is None or mapping.ebs is None:
            continue
        out.append(DataVolume(
            device=mapping.device, image=ami.volume_image_name(mapping.device),
            size=int(mapping.ebs.volume_size or 1) * GiB, filesystem=content.filesystem,
            label=content.label, mount_point=content.mount_point or f"/mnt/{content.label}",
            fs_uuid=fixed_uuid(seed, f"volume:{mapping.device}"), files=tuple(content.files)))
    return out


def sha256_file(path: Any, chunk: int = 4 * MiB) -> str:
    """sha256 of a file; holes of sparse files are hashed from memory, not read."""
    from builder.host.fsutil import data_extents

    digest = hashlib.sha256()
    zeros = memoryview(bytes(chunk))
    with open(path, "rb") as handle:
        fd, position = handle.fileno(), 0
        size = os.fstat(fd).st_size
        for start, length in [*data_extents(fd, size), (size, 0)]:
            while position < start:  # a hole
                step = min(chunk, start - position)
                digest.update(zeros[:step])
                position += step
            while position < start + length:
                block = os.pread(fd, min(chunk, start + length - position), position)
                digest.update(block)
                position += len(block)
    return digest.hexdigest()

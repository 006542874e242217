"""The Plan: a recipe with every default resolved. Sizes are bytes, UUIDs are fixed (derived
from the recipe, so a plan and the images it makes are reproducible), the partition layout
and the package set are final. Every later stage reads the plan and nothing else."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from builder import distros
from builder.amiplan import AmiPlan, DataVolume, ami_plan
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

# Drivers the initramfs needs to find the root disk on EC2 (Xen: xen-blkfront; Nitro and
# Graviton: nvme) and under QEMU (virtio, AHCI, PIIX; arm64's virt machine: virtio over
# PCI or MMIO), instead of initramfs-tools' MODULES=most: a third of the size, faster to
# build, load and unpack.
INITRAMFS_DRIVERS = {
    "x86_64": ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ahci", "ata_piix",
               "xen_blkfront", "nvme"),
    "arm64": ("virtio_pci", "virtio_mmio", "virtio_blk", "virtio_scsi", "sd_mod", "nvme"),
}
# Serial consoles: EC2's x86_64 and Graviton instances have ttyS0; QEMU's arm64 virt
# machine a PL011 (ttyAMA0). The kernel skips one that does not exist; the last is
# /dev/console.
CONSOLES = {"x86_64": ("console=tty0", "console=ttyS0,115200n8"),
            "arm64": ("console=tty0", "console=ttyAMA0,115200n8", "console=ttyS0,115200n8")}


@dataclass(frozen=True)
class OSPlan:
    distribution: str
    release: str
    mirror: str
    security_mirror: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    architecture: str
    packages: tuple[str, ...]
    initramfs_modules: tuple[str, ...]
    dpkg_options: tuple[str, ...] = DPKG_EXCLUDES
    # the mirrors' credentials as apt auth.conf entries: never shown, cached or imaged
    apt_auth: str | None = field(default=None, repr=False, compare=False,
                                 metadata={"private": True})

    @property
    def sources(self) -> tuple[tuple[str, str], ...]:
        """(URI, suite) of every apt source: a ``*-security`` suite comes from the security
        archive, every other from the mirror."""
        return tuple((self.security_mirror if suite.endswith("-security") else self.mirror,
                      suite) for suite in self.suites)


@dataclass(frozen=True)
class Source:
    """A file the recipe pulled in (the recipe itself, what it extends, apps, templates,
    files): its name relative to the recipe's folder, its absolute path, its sha256.
    Printed plans and cache keys see the name and the sha256, never the machine's path."""

    name: str
    path: str = field(metadata={"private": True})
    sha256: str


@dataclass(frozen=True)
class Plan:
    name: str
    description: str
    arch: str
    recipe_path: str
    sources: tuple[Source, ...]
    source_date_epoch: int
    hostname: str
    os: OSPlan
    boot: str
    secure_boot: bool
    grow_root: bool
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
    sbom_formats: tuple[str, ...]
    ami: AmiPlan
    reproducible: bool = False
    audit_allow: tuple[Any, ...] = ()
    environment_read: tuple[str, ...] = ()

    @property
    def root(self) -> Partition:
        return self.partitions[-1]

    def partition(self, name: str) -> Partition | None:
        return next((p for p in self.partitions if p.name == name), None)

    @property
    def data_volumes(self) -> tuple[DataVolume, ...]:
        return self.ami.data_volumes

    def source(self, name: str) -> Source:
        """A file the recipe names (``files[].src``)."""
        return next(s for s in self.sources if s.name == name)

    def digests(self, files: Iterable[FileSpec]) -> dict[str, str]:
        """name -> sha256 of the files ``files`` copy from the recipe's folder: what a
        stage installing them depends on."""
        return {s.src: self.source(s.src).sha256 for s in files if s.src is not None}

    def to_dict(self) -> dict[str, Any]:
        return plain(self)  # type: ignore[no-any-return]


def plain(value: Any) -> Any:
    """JSON-ready data of a plan part, keys sorted; fields marked private (the mirror's
    credentials, machine paths) are left out of plans, cache keys and manifests."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name))
                for f in sorted(fields(value), key=lambda f: f.name)
                if not f.metadata.get("private")}
    if isinstance(value, BaseModel):
        return plain(value.model_dump(exclude_none=True))
    if isinstance(value, dict):
        return {k: plain(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
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
              recipe.os.kernel or distribution.kernel_for(recipe.arch),
              *distribution.arch_packages.get(recipe.arch, ())]
    if volume.secure_boot:
        wanted += distribution.signed_boot_packages[recipe.arch]
    if volume.grow:
        wanted += distribution.release(recipe.os.release).repart_packages
    if any(user.sudo for user in volume.users):
        wanted.append("sudo")
    wanted += volume.packages
    return tuple(dict.fromkeys(wanted))


def make_plan(loaded: LoadedRecipe) -> Plan:
    recipe = loaded.recipe
    distribution = distros.get(recipe.os.distribution)
    volume = recipe.root_volume
    disk_size = align_up(volume.size)
    # partition and filesystem UUIDs: the same for every release of a recipe (its name as
    # written, not as rendered with the build's date), so that two releases differ only
    # where their contents do (publish --parent sends just those blocks)
    seed = f"{loaded.name_template or recipe.name}\0{loaded.path.stem}"
    partitions = layout(seed, recipe.arch, volume.boot, disk_size, volume.filesystem)
    release = distribution.release(recipe.os.release)
    mirror, apt_auth = split_credentials(recipe.os.mirror or distribution.default_mirror)
    security, security_auth = split_credentials(recipe.os.security_mirror or
                                                distribution.security_mirror)
    os_plan = OSPlan(
        distribution=distribution.name,
        release=release.codename,
        mirror=mirror,
        security_mirror=security,
        suites=tuple(dict.fromkeys(recipe.os.suites or release.default_suites())),
        apt_auth="".join(a for a in (apt_auth, security_auth) if a) or None,
        components=tuple(recipe.os.components or distribution.default_components),
        architecture=distribution.debian_arch(recipe.arch),
        packages=packages_for(recipe, distribution),
        initramfs_modules=INITRAMFS_DRIVERS[recipe.arch],
    )
    cmdline = ("ro", *CONSOLES[recipe.arch], *volume.kernel_cmdline)
    ami = ami_plan(recipe, lambda purpose: fixed_uuid(seed, purpose), loaded.base_dir)
    return Plan(
        name=recipe.name,
        description=recipe.description,
        arch=recipe.arch,
        recipe_path=loaded.path.name,
        sources=sources_of(loaded, [*volume.files,
                                    *(f for v in ami.data_volumes for f in v.files)]),
        source_date_epoch=loaded.build_time,
        reproducible=loaded.reproducible,
        hostname=volume.hostname,
        os=os_plan,
        boot=volume.boot,
        secure_boot=volume.secure_boot,
        grow_root=volume.grow,
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
        sbom_formats=tuple(dict.fromkeys(recipe.outputs.sbom)),
        ami=ami,
        audit_allow=tuple(recipe.audit.allow),
        environment_read=loaded.env_read,
    )


def sources_of(loaded: LoadedRecipe, files: Iterable[FileSpec]) -> tuple[Source, ...]:
    """Every file the recipe pulled in (what it read, and what ``files`` copy), the recipe
    first, each hashed once. A name is relative to the recipe's folder, as
    ``files[].src`` is (absolute when outside it)."""
    paths = [*loaded.sources, *(loaded.base_dir / f.src for f in files if f.src)]
    unique = dict.fromkeys(path.resolve() for path in paths)
    return tuple(Source(_name(path, loaded.base_dir), str(path), sha256_file(path))
                 for path in unique)


def _name(path: Path, base_dir: Path) -> str:
    return os.path.relpath(path, base_dir) if base_dir in path.parents else str(path)


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

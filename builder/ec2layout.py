"""A build's block device mapping as an instance sees it, for ``build boot OUTPUT_DIR --ec2``:
the root volume (as large as the mapping says), each EBS volume (the one amiforge filled, or
a blank one), then each instance-store volume (blank), in the mapping's order, read from the
output's register-image.json (what RegisterImage gets)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import InputError
from builder.host.fsutil import read_json
from builder.host.run import qemu_img
from builder.outputs.ami import SNAPSHOT_PLACEHOLDER

GiB = 1 << 30
INSTANCE_STORE_SIZE = 4 * GiB  # the instance type decides it on EC2; a stand-in here
MAX_VOLUME_GIB = 64            # larger mapped volumes boot as this (sparse, never filled)
MAX_MAPPINGS = 48              # root, /dev/sd[b-z], ephemeral0-23 would be fewer


@dataclass(frozen=True)
class Volume:
    device: str           # the mapping's name: /dev/sdf, /dev/sdb
    image: Path | None    # None: blank
    size: int             # bytes
    kind: str             # "ebs" or "instance-store"
    metadata_name: str    # block-device-mapping/NAME in the metadata: ebs1, ephemeral0


@dataclass(frozen=True)
class Layout:
    root: Path
    root_size: int | None
    volumes: tuple[Volume, ...]


def mapping_layout(out_dir: Path) -> Layout:
    manifest = read_json(out_dir / "register-image.json")
    if not isinstance(manifest, dict):
        raise InputError(f"{out_dir}/register-image.json: not a RegisterImage request")
    root_device = manifest.get("RootDeviceName")
    root, root_size, volumes = _image(out_dir, "disk"), None, []
    mappings = manifest.get("BlockDeviceMappings") or []
    if not isinstance(mappings, list) or not all(isinstance(m, dict) for m in mappings):
        raise InputError(f"{out_dir}/register-image.json: BlockDeviceMappings is not a list "
                         "of mappings")
    if len(mappings) > MAX_MAPPINGS:
        raise InputError(f"{out_dir}/register-image.json: more than {MAX_MAPPINGS} block "
                         "device mappings")
    for mapping in mappings:
        device, ebs = str(mapping.get("DeviceName", "")), mapping.get("Ebs")
        if device == root_device and isinstance(ebs, dict):
            root_size = _gib(ebs.get("VolumeSize"))
        elif isinstance(ebs, dict):
            number = sum(v.kind == "ebs" for v in volumes) + 1
            volumes.append(_ebs_volume(out_dir, device, ebs, f"ebs{number}"))
        elif str(mapping.get("VirtualName", "")).startswith("ephemeral"):
            volumes.append(Volume(device, None, INSTANCE_STORE_SIZE, "instance-store",
                                  str(mapping["VirtualName"])))
    return Layout(root, root_size, tuple(volumes))


def attach(layout: Layout, blanks: Path) -> tuple[list[Path], list[Path],
                                                 tuple[tuple[str, str], ...]]:
    """The EBS volumes' images and the instance-store ones' (blank volumes made as sparse
    qcow2 files in ``blanks``), and the metadata's block-device-mapping entries."""
    disks: dict[str, list[Path]] = {"ebs": [], "instance-store": []}
    for index, volume in enumerate(layout.volumes):
        image = volume.image
        if image is None:
            image = blanks / f"blank{index}.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", str(image), str(volume.size))
        disks[volume.kind].append(image)
    devices = tuple((v.metadata_name, v.device.removeprefix("/dev/")) for v in layout.volumes)
    return disks["ebs"], disks["instance-store"], devices


def _ebs_volume(out_dir: Path, device: str, ebs: dict[str, Any], name: str) -> Volume:
    """A volume amiforge filled (its image in ``out_dir``, by the snapshot placeholder's
    file name: only the name's stem is used, so it cannot point elsewhere) or a blank one."""
    snapshot = str(ebs.get("SnapshotId", ""))
    image = None
    prefix = SNAPSHOT_PLACEHOLDER.format(image="")
    if snapshot.startswith(prefix):  # amiforge made the volume: its image is in out_dir
        image = _image(out_dir, Path(snapshot.removeprefix(prefix)).stem)
    size = _gib(ebs.get("VolumeSize")) or (GiB if image is None else 0)
    return Volume(device, image, size, "ebs", name)


def _image(out_dir: Path, stem: str) -> Path:
    for suffix in (".qcow2", ".raw"):
        if (out_dir / f"{stem}{suffix}").is_file():
            return out_dir / f"{stem}{suffix}"
    raise InputError(f"{out_dir}: no {stem}.qcow2 or {stem}.raw to boot")


def _gib(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return min(value, MAX_VOLUME_GIB) * GiB
    return None

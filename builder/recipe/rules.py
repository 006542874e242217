"""Rules that span several keys: boot modes, AWS's block device and AMI limits. Each rule
yields (key path, message); the loader turns them into located problems."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from builder import distros
from builder.aws.limits import MAX_RECIPE_TAGS, deprecation_limit_days, ssm_name_problem
from builder.errors import InputError
from builder.host.aptauth import split_credentials
from builder.recipe.model import Recipe, UefiCertificates
from builder.recipe.sizes import MAX_DISK, MIN_ROOT_PARTITION, format_size, layout_overhead

GiB = 1 << 30
AMI_NAME = re.compile(r"^[A-Za-z0-9 ()\[\]./\-'@_]{3,128}$")
ROOT_DEVICES = ("/dev/xvda", "/dev/sda1")
OTHER_DEVICE = re.compile(r"^/dev/(sd|xvd)[b-z]$")
INSTANCE_STORE_MAX = 10 * GiB
# volume type: (min GiB, max GiB)
SIZE_LIMITS = {"gp2": (1, 16384), "gp3": (1, 16384), "io1": (4, 16384), "io2": (4, 65536),
               "st1": (125, 16384), "sc1": (125, 16384), "standard": (1, 1024)}
# volume type: (min iops, max iops, max iops per GiB)
IOPS_LIMITS = {"gp3": (3000, 16000, 500), "io1": (100, 64000, 50), "io2": (100, 256000, 500)}
THROUGHPUT = (125, 1000)

Found = Iterator[tuple[tuple[Any, ...], str]]


def image_gib(recipe: Recipe) -> int:
    return -(-recipe.root_volume.size // GiB)


def check(recipe: Recipe) -> Found:
    yield from size_rules(recipe)
    yield from mirror_rules(recipe)
    yield from release_rules(recipe)
    yield from suite_rules(recipe)
    yield from encryption_rules(recipe)
    yield from boot_rules(recipe)
    yield from ami_rules(recipe)
    yield from device_rules(recipe)
    yield from output_rules(recipe)


def output_rules(recipe: Recipe) -> Found:
    if "spdx" not in recipe.outputs.sbom:  # CycloneDX goes beside it, never instead
        yield (("outputs", "sbom"), "must list spdx: every build writes sbom.spdx.json "
               "(write [spdx, cyclonedx] for both)")


def size_rules(recipe: Recipe) -> Found:
    volume = recipe.root_volume
    least = layout_overhead(volume.boot) + MIN_ROOT_PARTITION
    if volume.size < least:
        yield (("root_volume", "size"), f"{format_size(volume.size)} leaves no room for the "
               f"{volume.boot} layout and a root filesystem: at least {format_size(least)}")
    elif volume.size > MAX_DISK:
        yield ("root_volume", "size"), f"at most {format_size(MAX_DISK)} (an EBS volume's limit)"


def mirror_rules(recipe: Recipe) -> Found:
    for key in ("mirror", "security_mirror"):
        url = getattr(recipe.os, key)
        if url is None:
            continue
        try:
            split_credentials(url)
        except InputError as exc:
            yield ("os", key), str(exc).removeprefix("os.mirror: ")


def encryption_rules(recipe: Recipe) -> Found:
    """What AWS refuses about encrypted AMIs, said at plan time, not after an upload.
    https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/sharingamis-intro.html: "AMIs with
    encrypted volumes cannot be made public", and AMIs whose snapshots use the default AWS
    managed key cannot be shared (a customer managed key, kms_key_id, can)."""
    permissions = recipe.ami.launch_permissions
    shared = bool(permissions.accounts or permissions.organization_arns
                  or permissions.organizational_unit_arns)
    for index, mapping in enumerate(recipe.block_device_mappings):
        ebs = mapping.ebs
        if ebs is None:
            continue
        at = ("block_device_mappings", index, "ebs")
        snapshot = mapping.root or ebs.content is not None
        if ebs.kms_key_id and not snapshot:
            yield ((*at, "kms_key_id"), "an empty volume's key is chosen at launch "
                   "(RunInstances): RegisterImage takes no KmsKeyId")
        if snapshot and (ebs.encrypted or ebs.kms_key_id) and permissions.public:
            yield ((*at, "encrypted"), "AWS does not let AMIs with encrypted snapshots be "
                   "public (ami.launch_permissions.public)")
        elif snapshot and ebs.encrypted and not ebs.kms_key_id and shared:
            yield ((*at, "encrypted"), "AWS shares AMIs with encrypted snapshots only when "
                   "they use a customer managed key: give ebs.kms_key_id")


def host_path_rules(recipe: Recipe) -> Found:
    """A file:// mirror reads the build host's files: like a path outside the recipe's
    folder, it takes --allow-host-paths."""
    for key in ("mirror", "security_mirror"):
        if (getattr(recipe.os, key) or "").startswith("file://"):
            yield (("os", key), "a file:// mirror reads the build host's files "
                   "(pass --allow-host-paths to allow)")


def suite_rules(recipe: Recipe) -> Found:
    """os.suites: the release's own suites only, so an image is what its release says."""
    distribution = distros.get(recipe.os.distribution)
    release = distribution.releases.get(recipe.os.release or distribution.default_release)
    if release is None or recipe.os.suites is None:
        return
    allowed = {release.codename, release.security_suite,
               *(f"{release.codename}-{s}" for s in ("updates", "backports",
                                                      "proposed-updates"))}
    for index, suite in enumerate(recipe.os.suites):
        if suite not in allowed:
            yield (("os", "suites", index), f"{suite!r} is not a suite of "
                   f"{release.codename}: {', '.join(sorted(allowed))}")


def release_rules(recipe: Recipe) -> Found:
    distribution = distros.get(recipe.os.distribution)
    release = recipe.os.release
    if release is not None and release not in distribution.releases:
        known = ", ".join(f"{r.codename} ({r.version})"
                          for r in distribution.releases.values())
        yield (("os", "release"), f"{release!r} is not a release amiforge knows for "
               f"{distribution.name}: {known}")


def effective_boot_mode(recipe: Recipe) -> str:
    if recipe.ami.boot_mode:
        return recipe.ami.boot_mode
    return {"bios": "legacy-bios", "uefi": "uefi", "hybrid": "uefi-preferred"}[
        recipe.root_volume.boot]


UEFI_DATA_MAX = 64000  # RegisterImage's UefiData
SIGNED_BOOT = ("x86_64", "arm64")  # architectures whose signed boot chain amiforge builds


def boot_rules(recipe: Recipe) -> Found:
    boot, mode = recipe.root_volume.boot, recipe.ami.boot_mode
    if recipe.arch == "arm64" and boot != "uefi":
        yield ("root_volume", "boot"), f"arm64 images boot with UEFI only (got {boot!r})"
    allowed = {"legacy-bios": ("bios", "hybrid"), "uefi": ("uefi", "hybrid"),
               "uefi-preferred": ("hybrid",)}
    if mode and boot not in allowed[mode]:
        yield (("ami", "boot_mode"), f"{mode!r} needs root_volume.boot "
               f"{' or '.join(allowed[mode])} (got {boot!r})")
    effective = effective_boot_mode(recipe)
    if recipe.ami.tpm_support and effective != "uefi":
        yield (("ami", "tpm_support"), "NitroTPM needs ami.boot_mode 'uefi' "
               f"(boot mode is {effective!r}, root_volume.boot is {boot!r})")
    if recipe.ami.uefi_data and boot == "bios":
        yield ("ami", "uefi_data"), "uefi_data needs a UEFI-bootable image (boot is 'bios')"
    elif recipe.ami.uefi_data and effective == "legacy-bios":
        yield ("ami", "uefi_data"), ("needs ami.boot_mode 'uefi' (an instance that boots "
                                     "legacy-bios has no UEFI variables)")
    elif _enrolls_platform_key(recipe) and not recipe.root_volume.secure_boot:
        yield ("ami", "uefi_data"), ("enrolls a platform key, so instances boot with Secure "
                                     "Boot enforced: needs root_volume.secure_boot (amiforge's "
                                     "own GRUB is not signed)")
    if isinstance(recipe.ami.uefi_data, str):
        yield from _uefi_blob_rules(recipe.ami.uefi_data)
    if recipe.root_volume.secure_boot:
        yield from _secure_boot_rules(recipe, effective)


def _enrolls_platform_key(recipe: Recipe) -> bool:
    from builder.outputs.uefivars import enrolls_platform_key

    return enrolls_platform_key(recipe.ami.uefi_data)


def _secure_boot_rules(recipe: Recipe, effective: str) -> Found:
    """A Secure Boot image boots UEFI only (a hybrid disk's BIOS half, or EC2's BIOS
    fallback, would boot amiforge's unsigned GRUB without a word), on an architecture whose
    signed chain amiforge builds, with a signed kernel."""
    where = ("root_volume", "secure_boot")
    if recipe.root_volume.boot == "bios":
        yield where, "Secure Boot is UEFI's: needs boot uefi or hybrid"
    elif effective != "uefi":
        yield where, (f"needs ami.boot_mode 'uefi' (boot mode is {effective!r}: an instance "
                      "could start the disk's unsigned BIOS loader instead)")
    if recipe.arch not in SIGNED_BOOT:
        yield where, (f"not built for {recipe.arch} yet (only {', '.join(SIGNED_BOOT)}: "
                      "Debian's signed shim and GRUB for it are booted under enforcing "
                      "firmware in amiforge's tests)")
    if recipe.os.kernel and recipe.os.kernel.endswith("-unsigned"):
        yield ("os", "kernel"), "Secure Boot needs a signed kernel (not an -unsigned package)"


def uefi_certificate_rules(recipe: Recipe, base_dir: Path) -> Found:
    """Each file of ami.uefi_data.certificates is an X.509 certificate (PEM or DER), and the
    variable store they make fits RegisterImage's UefiData."""
    from builder.outputs.uefivars import (
        SHIM_SIGNER,
        certificate_files,
        enrolled,
        read_certificate,
        shim_signer,
    )

    value = recipe.ami.uefi_data
    if not isinstance(value, UefiCertificates):
        return
    where, read, bad = ("ami", "uefi_data", "certificates"), [], False
    for variable, index, name in certificate_files(value.certificates):
        at = (*where, "pk") if index is None else (*where, variable.lower(), index)
        try:
            read.append((variable, read_certificate(base_dir / name)))
        except (ValueError, OSError) as exc:
            bad = True
            yield at, f"{name}: not an X.509 certificate, PEM or DER ({str(exc)[:80]})"
    if bad:
        return
    if shim_signer() not in [der for variable, der in read if variable == "db"]:
        yield (*where, "db"), (f"none is {SHIM_SIGNER}'s certificate, which signed Debian's "
                               "shim: instances would refuse to start it")
    if len(enrolled(read)) > UEFI_DATA_MAX:
        yield where, f"the variable store exceeds {UEFI_DATA_MAX} characters (RegisterImage)"


def _uefi_blob_rules(blob: str) -> Found:
    """A UefiData blob given as is must be one AWS can read: at most 64000 characters
    (RegisterImage), an AWS variable store that decodes."""
    from builder.outputs.uefivars import decoded

    if len(blob) > UEFI_DATA_MAX:
        yield ("ami", "uefi_data"), f"at most {UEFI_DATA_MAX} characters (RegisterImage)"
        return
    try:
        decoded(blob)
    except InputError as exc:
        yield ("ami", "uefi_data"), str(exc).removeprefix("ami.uefi_data: ")


def ami_rules(recipe: Recipe) -> Found:
    name = recipe.ami.name or recipe.name
    path = ("ami", "name") if recipe.ami.name else ("name",)
    if not AMI_NAME.match(name):
        yield path, (f"{name!r} is not a valid AMI name: 3-128 characters of letters, digits, "
                     "spaces and ( ) [ ] . / - ' @ _")
    if recipe.ami.backing == "instance-store":
        if recipe.root_volume.size > INSTANCE_STORE_MAX:
            yield (("root_volume", "size"),
                   f"instance-store images may be at most 10 GiB (got {image_gib(recipe)} GiB)")
        if recipe.ami.tpm_support or recipe.ami.uefi_data:
            yield ("ami", "backing"), "instance-store AMIs support neither NitroTPM nor UEFI data"
    if recipe.ami.description is not None and len(recipe.ami.description) > 255:
        yield ("ami", "description"), "must be at most 255 characters"
    if len(recipe.ami.tags) > MAX_RECIPE_TAGS:
        yield (("ami", "tags"), f"at most {MAX_RECIPE_TAGS} tags: AWS allows 50 per resource "
               "and publish adds 6 amiforge:* tags to each snapshot")
    for key in recipe.ami.tags:
        if key.lower().startswith("aws:"):
            yield ("ami", "tags", key), "tag keys starting with 'aws:' are reserved by AWS"
    yield from distribution_rules(recipe)


def distribution_rules(recipe: Recipe) -> Found:
    """What publish and copy do after RegisterImage, checked before any upload (the limits
    and their AWS pages: builder.aws.limits). ModifySnapshotAttribute's
    createVolumePermission takes accounts and the group "all" only."""
    ami = recipe.ami
    permissions = ami.launch_permissions
    if ami.deprecate_after:
        days, limit = int(ami.deprecate_after[:-1]), deprecation_limit_days(permissions.public)
        if days > limit:
            which = "a public AMI" if permissions.public else "an AMI"
            yield (("ami", "deprecate_after"),
                   f"AWS deprecates {which} at most {limit} days ahead (got {days})")
    if ami.share_snapshots:
        if permissions.organization_arns or permissions.organizational_unit_arns:
            yield (("ami", "share_snapshots"), "snapshots can be shared with accounts and "
                   "made public, not with organizations or OUs")
        elif not (permissions.accounts or permissions.public):
            yield (("ami", "share_snapshots"), "no one to share with: "
                   "ami.launch_permissions has no accounts and is not public")
        if ami.backing == "instance-store":
            yield ("ami", "share_snapshots"), "instance-store AMIs have no snapshots"
    for index, name in enumerate(ami.ssm_parameters):
        problem = ssm_name_problem(name)
        if problem:
            yield ("ami", "ssm_parameters", index), problem


def device_rules(recipe: Recipe) -> Found:
    mappings = recipe.block_device_mappings
    roots = [i for i, m in enumerate(mappings) if m.root]
    seen: dict[str, int] = {}
    instance_store = recipe.ami.backing == "instance-store"
    if len(roots) > 1:
        yield ("block_device_mappings", roots[1], "root"), "only one mapping can be the root"
    if instance_store and roots:
        yield (("block_device_mappings", roots[0], "root"),
               "instance-store AMIs get their root (sda1) from the bundle; remove root: true")
    ephemeral_names: dict[str, int] = {}
    for i, mapping in enumerate(mappings):
        at = ("block_device_mappings", i)
        if mapping.device in seen:
            yield (*at, "device"), (f"{mapping.device} is already mapped by entry "
                                    f"{seen[mapping.device]}")
        seen.setdefault(mapping.device, i)
        if mapping.root and mapping.device not in ROOT_DEVICES:
            yield (*at, "device"), ("the root device must be /dev/xvda or /dev/sda1 "
                                    f"(got {mapping.device})")
        if not mapping.root and not OTHER_DEVICE.match(mapping.device):
            yield (*at, "device"), (f"{mapping.device} is not a device name EC2 accepts "
                                    "(use /dev/sd[b-z] or /dev/xvd[b-z])")
        if mapping.virtual_name is not None:
            yield from _ephemeral(at, mapping.virtual_name, ephemeral_names, i, mapping.root)
        if mapping.no_device and mapping.root:
            yield (*at, "no_device"), "the root mapping cannot be no_device"
        if mapping.ebs is not None:
            yield from _ebs(recipe, at, mapping.ebs, mapping.root)
            yield from _xfs_names(at, mapping.ebs)


def _ephemeral(at: tuple[Any, ...], name: str, seen: dict[str, int], index: int,
               root: bool) -> Found:
    number = int(name.removeprefix("ephemeral"))
    if number > 23:
        yield (*at, "virtual_name"), f"{name}: instance store volumes are ephemeral0 to ephemeral23"
    if name in seen:
        yield (*at, "virtual_name"), f"{name} is already mapped by entry {seen[name]}"
    seen.setdefault(name, index)
    if root:
        yield (*at, "root"), "the root mapping must be an EBS volume"


def _ebs(recipe: Recipe, at: tuple[Any, ...], ebs: Any, root: bool) -> Found:
    at = (*at, "ebs")
    low, high = SIZE_LIMITS[ebs.volume_type]
    size = ebs.volume_size
    if size is None and not root:
        yield (*at, "volume_size"), "required for a volume that is not the root"
    if size is not None and not low <= size <= high:
        yield (*at, "volume_size"), f"{ebs.volume_type} volumes are {low}-{high} GiB (got {size})"
    if root and size is not None and size < image_gib(recipe):
        yield (*at, "volume_size"), (f"the root volume ({size} GiB) is smaller than the image "
                                     f"(root_volume.size is {image_gib(recipe)} GiB)")
    if root and ebs.content is not None:
        yield (*at, "content"), ("the root volume's content is root_volume; "
                                 "content is for data volumes")
    yield from _iops(at, ebs, size)
    if ebs.throughput is not None:
        if ebs.volume_type != "gp3":
            yield (*at, "throughput"), f"throughput applies to gp3 only (got {ebs.volume_type})"
        elif not THROUGHPUT[0] <= ebs.throughput <= THROUGHPUT[1]:
            yield (*at, "throughput"), f"gp3 throughput is 125-1000 MiB/s (got {ebs.throughput})"
    if ebs.kms_key_id and not ebs.encrypted:
        yield (*at, "kms_key_id"), "kms_key_id needs encrypted: true"


def _xfs_names(at: tuple[Any, ...], ebs: Any) -> Found:
    """mkfs.xfs's protofile separates fields by white space: its files cannot hold any."""
    content = ebs.content
    if content is None or content.filesystem != "xfs":
        return
    for index, spec in enumerate(content.files):
        if any(c.isspace() for c in spec.dest):
            yield ((*at, "ebs", "content", "files", index, "dest"),
                   "files on an xfs data volume cannot have white space in their names")


def _iops(at: tuple[Any, ...], ebs: Any, size: int | None) -> Found:
    limits = IOPS_LIMITS.get(ebs.volume_type)
    if ebs.iops is None:
        if ebs.volume_type in ("io1", "io2"):
            yield (*at, "iops"), f"{ebs.volume_type} volumes need iops"
        return
    if limits is None:
        yield (*at, "iops"), f"iops applies to gp3, io1 and io2 only (got {ebs.volume_type})"
        return
    low, high, per_gib = limits
    if not low <= ebs.iops <= high:
        yield (*at, "iops"), f"{ebs.volume_type} iops are {low}-{high} (got {ebs.iops})"
    elif size is not None and ebs.iops > per_gib * size and ebs.volume_type != "gp3":
        yield (*at, "iops"), (f"{ebs.volume_type} allows at most {per_gib} iops per GiB: "
                              f"{ebs.iops} iops needs at least {-(-ebs.iops // per_gib)} GiB "
                              f"(volume_size is {size})")

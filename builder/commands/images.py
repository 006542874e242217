"""`build boot`, `build unbundle`, `build cache`, `build audit`: commands on images."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from builder.aws.launch import DEFAULT_TYPES
from builder.commands.args import Parser, regex
from builder.errors import InputError
from builder.host.fsutil import read_regular_file
from builder.imds import MAX_USER_DATA, Instance, MetadataService
from builder.recipe.model import SSH_PUBLIC_KEY

EXIT_OK = 0
EXIT_DIFFERENT = 1  # build diff, as diff(1)
MAX_DISKS = 21  # build boot --disk: /dev/sdf to /dev/sdz


def cmd_boot(argv: Sequence[str]) -> int:
    from builder.vm import VirtualMachine

    args = boot_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="amiforge-boot-") as blanks, \
            VirtualMachine(**machine_for(args, Path(blanks))) as vm:
        try:
            seconds = vm.wait_for(args.pattern, args.timeout)
        finally:
            if args.console:
                print(vm.console())
            if vm.imds is not None:
                print(imds_summary(vm.imds), file=sys.stderr)
    print(f"BOOT OK {seconds:.1f}")
    return EXIT_OK


def boot_parser() -> Parser:
    from builder.recipe.sizes import parse_size
    from builder.vm import FIRMWARES, LOGIN_PROMPT

    parser = Parser(prog="build boot", description="Boot an image under QEMU (TCG) on a "
                     "throw-away overlay and wait for a login prompt on the serial console "
                     "(or --expect REGEX): exit 0 when it shows, 1 on timeout.")
    parser.add_argument("image", type=Path, help="an image file, or (--ec2) a build's "
                        "output directory: its block device mapping, laid out")
    parser.add_argument("--firmware", choices=FIRMWARES, default="bios",
                        help="uefi-secureboot: OVMF enforcing Secure Boot with Microsoft's "
                        "keys enrolled")
    parser.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64",
                        help="the image's architecture (arm64: qemu-system-aarch64, UEFI)")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--expect", "--pattern", dest="pattern", default=LOGIN_PROMPT,
                        type=regex, metavar="REGEX", help="wait for this on the serial "
                        "console instead (e.g. what a user-data script prints)")
    parser.add_argument("--console", action="store_true", help="print the console log")
    parser.add_argument("--ec2", action="store_true", help="an EC2-like machine: disks on "
                        "NVMe with EBS-like serials, EC2's SMBIOS, an IMDSv2 metadata "
                        "service (no ENA: the NIC is virtio)")
    parser.add_argument("--disk", action="append", type=Path, default=[], metavar="IMAGE",
                        help="another disk (a data volume image), in order")
    parser.add_argument("--root-size", type=parse_size, metavar="SIZE",
                        help="the root disk this large (as an EBS volume larger than the "
                        "image), e.g. 4GiB")
    parser.add_argument("--user-data", type=Path, metavar="FILE", help="(--ec2) the "
                        "instance's user data, served by the metadata service")
    parser.add_argument("--ssh-key", type=Path, metavar="PUB", help="(--ec2) an OpenSSH "
                        "public key file: the instance's key pair (public-keys/0)")
    return parser


def machine_for(args: argparse.Namespace, blanks: Path) -> dict[str, Any]:
    """VirtualMachine's arguments: an image and --disk images, or (--ec2) an output
    directory's mapping, whose blank volumes are made in ``blanks``."""
    from builder.vm import image_size

    if not args.ec2 and (args.user_data or args.ssh_key):
        raise InputError("build boot: --user-data and --ssh-key are for an EC2-like machine "
                         "(--ec2)")
    if len(args.disk) > MAX_DISKS:
        raise InputError(f"build boot: at most {MAX_DISKS} --disk (sdf to sdz)")
    if args.image.is_dir():
        machine = mapped_machine(args, blanks)
    else:
        for image in (args.image, *args.disk):
            if not image.is_file():
                raise InputError(f"{image}: image not found")
        devices = tuple((f"ebs{i + 1}", f"sd{chr(ord('f') + i)}")
                        for i in range(len(args.disk)))
        machine = {"image": args.image, "extra_disks": args.disk, "root_size": args.root_size,
                   "block_devices": devices}
    if machine["root_size"] is not None and machine["root_size"] < image_size(machine["image"]):
        raise InputError(f"--root-size: smaller than {machine['image']} "
                         f"({image_size(machine['image'])} bytes)")
    devices = machine.pop("block_devices")
    instance = ec2_instance(args, devices) if args.ec2 else None
    return {**machine, "firmware": args.firmware, "arch": args.arch, "ec2": args.ec2,
            "instance": instance}


def mapped_machine(args: argparse.Namespace, blanks: Path) -> dict[str, Any]:
    """An output directory booted as an instance of its AMI: the root volume as large as
    the mapping says, its EBS volumes (filled or blank), then its instance-store volumes."""
    from builder.ec2layout import attach, mapping_layout

    if not args.ec2 or args.disk:
        raise InputError(f"{args.image}: an output directory boots as an instance of its "
                         "AMI (--ec2, without --disk); give an image file otherwise")
    layout = mapping_layout(args.image)
    ebs, instance_store, devices = attach(layout, blanks)
    return {"image": layout.root, "extra_disks": ebs, "instance_store": instance_store,
            "root_size": args.root_size or layout.root_size, "block_devices": devices}


def ec2_instance(args: argparse.Namespace, devices: tuple[tuple[str, str], ...]) -> Instance:
    """What the metadata service of ``build boot --ec2`` serves: the user data and key
    given, checked as AWS and OpenSSH would."""
    user_data = ssh_key = None
    if args.user_data is not None:
        user_data = read_regular_file(args.user_data, MAX_USER_DATA, f"--user-data "
                                      f"{args.user_data} (AWS takes 16 KB)", InputError)
    if args.ssh_key is not None:
        ssh_key = read_regular_file(args.ssh_key, 16 * 1024, f"--ssh-key {args.ssh_key}",
                                    InputError).decode(errors="replace").strip()
        if not re.fullmatch(SSH_PUBLIC_KEY, ssh_key):
            raise InputError(f"{args.ssh_key}: not one OpenSSH public key line "
                             "(TYPE BASE64 [COMMENT])")
    return Instance(architecture=args.arch, user_data=user_data, ssh_key=ssh_key,
                    instance_type=DEFAULT_TYPES[args.arch], block_devices=devices)


def imds_summary(service: MetadataService) -> str:
    """How the guest used the metadata service (counted over the recorded requests; those
    past the log's bound are only counted in the total)."""
    requests = service.requests
    tokens = sum(r.method == "PUT" and r.status == 200 for r in requests)
    refused = sum(r.status == 401 for r in requests)
    more = f" (counts from the first {len(requests)})" if service.unrecorded else ""
    return (f"metadata service: {len(requests) + service.unrecorded} requests, {tokens} "
            f"tokens given, {refused} refused for want of a valid token{more}")


def cmd_unbundle(argv: Sequence[str]) -> int:
    from builder.outputs.unbundle import unbundle

    parser = Parser(prog="build unbundle", description="Verify an instance-store bundle "
                     "and restore its image byte for byte.")
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--user-key", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path,
                        help="default: the bundle's prefix + .raw in the current folder")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    target = unbundle(args.manifest, args.user_key, args.output, args.force)
    print(f"{target}: restored, signature and digests verified")
    return EXIT_OK


def cmd_cache(argv: Sequence[str]) -> int:
    from builder.build import default_cache_dir
    from builder.pipeline.cache import StageCache
    from builder.recipe.sizes import SizeError, parse_size

    parser = Parser(prog="build cache", description="Show or prune the stage cache.")
    parser.add_argument("--cache-dir", type=Path, help="default: $XDG_CACHE_HOME/amiforge")
    parser.add_argument("--prune", action="store_true",
                        help="remove least recently used entries not in use by a build")
    parser.add_argument("--max-size", default="0",
                        help="with --prune: keep at most this much (e.g. 20GiB; default 0)")
    args = parser.parse_args(argv)
    cache = StageCache(args.cache_dir or default_cache_dir())
    try:
        limit = parse_size(args.max_size) if args.max_size != "0" else 0
    except SizeError as exc:
        raise InputError(f"--max-size: {exc}") from None
    if args.prune:
        removed = cache.prune(limit)
        print(f"removed {len(removed)} entries; {cache.size() / 2**30:.2f} GiB left")
        return EXIT_OK
    for entry in cache.entries():
        print(f"{entry.stage:<11} {entry.key}")
    print(f"{len(cache.entries())} entries, {cache.size() / 2**30:.2f} GiB in {cache.root}")
    return EXIT_OK


EXIT_AUDIT_ERRORS = 3


def cmd_diff(argv: Sequence[str]) -> int:
    from builder.diff.compare import compare
    from builder.diff.release import load_release, read_images, same_images
    from builder.diff.render import markdown, text

    parser = Parser(prog="build diff", description="What changed between two releases: "
                     "packages, kernel, files of the root filesystem, AMI attributes, block "
                     "device mappings, image size. A and B are output directories, their "
                     "build-manifest.json, or image files. Exit 0 when equal, 1 when not.")
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="the differences as JSON")
    shown.add_argument("--markdown", action="store_true", help="as Markdown, for release notes")
    parser.add_argument("--no-files", action="store_true", help="skip the file comparison "
                        "(which reads both images: about a minute)")
    args = parser.parse_args(argv)
    releases = [load_release(args.a), load_release(args.b)]
    same = not args.no_files and same_images(releases)
    if same:  # byte-identical images hold the same files
        releases[0].files = releases[1].files = {}
    read_images(releases, files=not (args.no_files or same))
    difference = compare(*releases)
    if args.json:
        print(json.dumps(difference.to_dict(), indent=2, sort_keys=True))
    else:
        print(markdown(difference) if args.markdown else text(difference))
    return EXIT_OK if difference.equal else EXIT_DIFFERENT


def cmd_audit(argv: Sequence[str]) -> int:
    from builder.audit.checks import run_checks
    from builder.audit.report import errors, table
    from builder.audit.views import GuestView
    from builder.vm import image_format

    parser = Parser(prog="build audit", description="Check a disk image (raw, qcow2, vmdk; "
                     "built by amiforge or not) for what must not ship in a shared AMI. "
                     "Exit 0 when clean, 3 when there are errors.")
    parser.add_argument("image", type=Path)
    parser.add_argument("--json", action="store_true", help="findings as JSON on stdout")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        raise InputError(f"{args.image}: image not found")
    try:
        view = GuestView(args.image, image_format(args.image))
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"{args.image}: cannot inspect the image: {exc}") from None
    try:
        findings = run_checks(view)
    except (RuntimeError, UnicodeError) as exc:  # e.g. a file name that is not UTF-8
        raise InputError(f"{args.image}: cannot read the image: {exc}") from None
    finally:
        view.close()
    if args.json:
        print(json.dumps({"image": str(args.image), "findings": [f.to_dict() for f in findings],
                          "errors": len(errors(findings))}, indent=2, sort_keys=True))
    else:
        print(table(findings))
    return EXIT_AUDIT_ERRORS if errors(findings) else EXIT_OK

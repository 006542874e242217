"""`build publish`, `share`, `copy`, `deregister`: the AMI lifecycle on AWS."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from builder.commands.args import Parser, regex
from builder.errors import InputError

EXIT_OK = 0
EXIT_DIFFERS = 1


def _aws_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", help="default: boto3's (AWS_REGION, profile, ...)")
    parser.add_argument("--endpoint-url", help="another endpoint, e.g. a local moto server")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the API calls it would make and make none")


def _aws(args: argparse.Namespace) -> Any:
    from builder.aws.session import Aws

    region = args.region or _default_region()
    return Aws(region=region, endpoint_url=args.endpoint_url, dry_run=args.dry_run)


def _default_region() -> str:
    import boto3

    region = boto3.session.Session().region_name
    if not region:
        raise InputError("no AWS region: pass --region or set AWS_REGION")
    return region


def _deprecate_at(args: argparse.Namespace) -> Any:
    import datetime as dt

    from builder.aws.distribute import parse_deprecate_at

    if args.deprecate_at is None:
        return None
    return parse_deprecate_at(args.deprecate_at, dt.datetime.now(dt.UTC))


def cmd_publish(argv: Sequence[str]) -> int:
    from builder.aws.publish import PublishOptions, publish, summary

    parser = Parser(prog="build publish", description="Upload a build's images (EBS "
                     "snapshots or an S3 bundle), register the AMI and share it.")
    parser.add_argument("output_dir", type=Path, nargs="?")
    parser.add_argument("--sweep", action="store_true", help="instead: delete the snapshots "
                        "interrupted publishes left (pending past StartSnapshot's timeout, or "
                        "cancelled), found by amiforge's tag in this account and region")
    parser.add_argument("--bucket", help="S3 bucket for instance-store bundles")
    parser.add_argument("--workers", type=int, default=16, help="parallel block uploads")
    parser.add_argument("--kms-key-id", help="encrypt every snapshot with this KMS key "
                        "(ARN, id or alias); a recipe's ebs.kms_key_id wins for its volume")
    parser.add_argument("--skip-zero-blocks", action="store_true",
                        help="send only the non-zero blocks of unencrypted snapshots: faster, "
                        "but a volume made encrypted from them at launch (encryption by "
                        "default, RunInstances, a copy) reads garbage where the image has "
                        "zeros")
    parser.add_argument("--deprecate-at", metavar="WHEN", help="deprecate the AMI at this "
                        "UTC date or time (ISO 8601); default: the recipe's ami.deprecate_after")
    parser.add_argument("--force", action="store_true", help="replace an AMI of the same name "
                        "(deregistered, its snapshots deleted once the new AMI is registered)")
    parser.add_argument("--verify", action="store_true", help="read every snapshot back and "
                        "compare it with its image before registering (exit 1 if one differs)")
    parser.add_argument("--parent", type=Path, metavar="PREV_OUT", help="start each snapshot "
                        "from the one PREV_OUT's publish made for the same device and send only "
                        "the blocks that differ from what it holds")
    parser.add_argument("--parent-snapshot", action="append", default=[],
                        metavar="DEVICE=SNAP", help="start DEVICE's snapshot from SNAP instead "
                        "(repeatable)")
    parser.add_argument("--parent-index", action="append", default=[], type=Path,
                        metavar="FILE", help="a parent's block index (a publish.json, or one "
                        "block_index of it): used when the parent snapshot carries its digest, "
                        "else what the parent holds is read from EBS (repeatable)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print a summary for tools: "
                       "image_ids (region -> AMI id), snapshot_ids, deprecate_at")
    shown.add_argument("--quiet", action="store_true", help="print only the AMI id")
    _aws_args(parser)
    args = parser.parse_args(argv)
    if args.sweep:
        from builder.aws.sweep import sweep

        print(json.dumps(sweep(_aws(args))))
        return EXIT_OK
    if args.output_dir is None:
        raise InputError("build publish: give OUTPUT_DIR (or --sweep)")
    if args.workers < 1:
        raise InputError("--workers must be at least 1")
    options = PublishOptions(args.bucket, args.workers, args.kms_key_id, args.skip_zero_blocks,
                             _deprecate_at(args), args.force, args.verify, _parents(args))
    state = publish(args.output_dir, _aws(args), options)
    if args.dry_run:
        return EXIT_OK
    if args.quiet:
        print(state["image_id"])
    else:
        print(json.dumps(summary(state) if args.json else state, indent=2, sort_keys=True))
    return EXIT_OK


def _parents(args: argparse.Namespace) -> Any:
    from builder.aws.delta import ParentOptions, parse_parent_snapshot

    snapshots = dict(parse_parent_snapshot(value) for value in args.parent_snapshot)
    if args.parent is not None and not (args.parent / "publish.json").is_file():
        raise InputError(f"--parent {args.parent}: no publish.json there (publish it first)")
    if args.parent_index and not (args.parent or snapshots):
        raise InputError("--parent-index: name the parent with --parent or --parent-snapshot")
    return ParentOptions(args.parent, snapshots, tuple(args.parent_index))


def cmd_launch(argv: Sequence[str]) -> int:
    from builder.aws.launch import LOGIN_PROMPT, LaunchOptions, check, image_of, launch

    parser = Parser(prog="build launch", description="Launch one instance of an AMI, wait "
                     "for a login prompt (or --expect REGEX) on its serial console, and "
                     "terminate it: exit 0 when seen, 1 when not (the console's last lines "
                     "are printed).")
    parser.add_argument("image_id", metavar="IMAGE_ID|OUTPUT_DIR")
    parser.add_argument("--instance-type", help="default: t3.micro, t4g.micro for arm64")
    parser.add_argument("--subnet", help="a subnet id (default: the default VPC's)")
    parser.add_argument("--key-name", help="an EC2 key pair for SSH")
    parser.add_argument("--security-group", action="append", default=[], metavar="SG_ID")
    parser.add_argument("--user-data", type=Path, metavar="FILE")
    parser.add_argument("--expect", default=LOGIN_PROMPT, type=regex, metavar="REGEX",
                        help="wait for this on the console (e.g. what user data prints)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds (default 900)")
    parser.add_argument("--keep", action="store_true", help="leave the instance running")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    _aws_args(parser)
    args = parser.parse_args(argv)
    aws = _aws(args)
    if args.timeout <= 0:
        raise InputError("--timeout must be positive")
    image_id = args.image_id if args.dry_run else image_of(args.image_id, aws)
    options = LaunchOptions(args.instance_type, args.subnet, args.key_name,
                            tuple(args.security_group), args.user_data, args.expect,
                            args.timeout, keep=args.keep)
    if args.dry_run:
        aws.would("ec2.RunInstances / GetConsoleOutput / TerminateInstances", ImageId=image_id)
        return EXIT_OK
    result = launch(aws.client("ec2"), image_id, options)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    check(result, args.expect)
    if not args.json:
        print(f"{result.instance_id}: {args.expect!r} after {result.seconds:.0f}s")
    return EXIT_OK


def cmd_verify_snapshot(argv: Sequence[str]) -> int:
    from builder.aws.delta import SNAPSHOT_ID
    from builder.aws.verify import verify_snapshot

    parser = Parser(prog="build verify-snapshot", description="Read an EBS snapshot back "
                     "(EBS direct API) and compare it with an image, block for block: exit 0 "
                     "when equal, 1 when not (naming the blocks), 2 on bad input.")
    parser.add_argument("snapshot_id")
    parser.add_argument("image", type=Path, help="the raw image the snapshot was made from")
    parser.add_argument("--workers", type=int, default=16, help="parallel block reads")
    parser.add_argument("--json", action="store_true", help="print the result for tools")
    _aws_args(parser)
    args = parser.parse_args(argv)
    if not SNAPSHOT_ID.fullmatch(args.snapshot_id):
        raise InputError(f"{args.snapshot_id!r}: not a snapshot id (snap-...)")
    if args.workers < 1:
        raise InputError("--workers must be at least 1")
    aws = _aws(args)
    if aws.dry_run:
        raise InputError("build verify-snapshot reads only: --dry-run has nothing to skip")
    result = verify_snapshot(aws.client("ebs"), aws.client("ec2"), args.snapshot_id,
                             args.image, args.workers)
    print(json.dumps(result.to_dict(), indent=2, sort_keys=True) if args.json
          else result.summary())
    return EXIT_OK if result.ok else EXIT_DIFFERS


def cmd_share(argv: Sequence[str]) -> int:
    from builder.aws.lifecycle import Grants, share
    from builder.aws.limits import ACCOUNT_ID, ORGANIZATION_ARN, OU_ARN

    parser = Parser(prog="build share", description="Change who may launch an AMI.")
    parser.add_argument("image_id")
    parser.add_argument("--account", action="append", default=[], help="a 12-digit account id")
    parser.add_argument("--organization-arn", action="append", default=[],
                        help="arn:aws:organizations::ACCOUNT:organization/o-...")
    parser.add_argument("--ou-arn", action="append", default=[],
                        help="arn:aws:organizations::ACCOUNT:ou/o-.../ou-...")
    parser.add_argument("--public", action="store_true")
    parser.add_argument("--private", action="store_true", help="remove every launch permission "
                        "and the snapshots' createVolumePermission")
    _aws_args(parser)
    args = parser.parse_args(argv)
    grants = Grants(tuple(args.account), tuple(args.organization_arn), tuple(args.ou_arn),
                    args.public)
    if args.private == bool(grants):
        raise InputError("build share: give --private, or who to share with (--account, "
                         "--organization-arn, --ou-arn, --public)")
    checks = [(value, pattern, option) for option, pattern, values in (
        ("--account", ACCOUNT_ID, args.account),
        ("--organization-arn", ORGANIZATION_ARN, args.organization_arn),
        ("--ou-arn", OU_ARN, args.ou_arn)) for value in values]
    for value, pattern, option in checks:
        if not pattern.match(value):
            raise InputError(f"{option} {value!r}: not {option.removeprefix('--')} "
                             "(see build share --help)")
    share(args.image_id, _aws(args), grants, args.private)
    return EXIT_OK


def cmd_copy(argv: Sequence[str]) -> int:
    from builder.aws.copy import CopyOptions, copy_image

    parser = Parser(prog="build copy", description="Copy an AMI to other regions at once, "
                     "with its tags, launch permissions and deprecation time.")
    parser.add_argument("source", metavar="IMAGE_ID|OUTPUT_DIR", help="an AMI id, or a "
                        "published build's output directory (publish.json records the copies)")
    parser.add_argument("--to-region", action="append", required=True, dest="regions")
    parser.add_argument("--kms-key-id", action="append", default=[], metavar="REGION=KEY",
                        help="encrypt the copy in REGION with KEY (id, alias or ARN there)")
    parser.add_argument("--deprecate-at", metavar="WHEN", help="deprecate the copies at this "
                        "UTC date or time (ISO 8601); default: the source's deprecation time")
    _aws_args(parser)
    args = parser.parse_args(argv)
    keys = dict(_region_key(text, args.regions) for text in args.kms_key_id)
    copies = copy_image(args.source, _aws(args),
                        CopyOptions(tuple(dict.fromkeys(args.regions)), keys, _deprecate_at(args)))
    if copies:
        print(json.dumps(copies, indent=2, sort_keys=True))
    return EXIT_OK


def _region_key(text: str, regions: list[str]) -> tuple[str, str]:
    region, _, key = text.partition("=")
    if not key:
        if len(regions) != 1:  # a key belongs to one region
            raise InputError(f"--kms-key-id {text!r}: give REGION=KEY (a key lives in one "
                             "region)")
        region, key = regions[0], text
    if region not in regions:
        raise InputError(f"--kms-key-id {text!r}: {region} is not one of --to-region")
    return region, key


def cmd_deregister(argv: Sequence[str]) -> int:
    from builder.aws.lifecycle import deregister

    parser = Parser(prog="build deregister", description="Deregister an AMI.")
    parser.add_argument("image_id")
    parser.add_argument("--delete-snapshots", action="store_true")
    _aws_args(parser)
    args = parser.parse_args(argv)
    deregister(args.image_id, _aws(args), args.delete_snapshots)
    return EXIT_OK

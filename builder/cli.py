"""The command line: ``build RECIPE`` and its subcommands. This is the only place that turns
errors into messages and exit codes: 0 ok, 1 build failed, 2 bad input, 130 interrupted."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from builder import __version__
from builder.errors import AmiforgeError, InputError, Interrupted, RecipeError
from builder.plan import make_plan
from builder.recipe.load import LoadOptions, load_recipe
from builder.recipe.model import json_schema

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every bad input
        self.print_usage(sys.stderr)
        raise InputError(f"{self.prog}: {message}")


def _common_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--var", action="append", default=[], metavar="KEY=VALUE",
                        help="set a recipe variable (wins over vars: and --var-file)")
    parser.add_argument("--var-file", action="append", default=[], type=Path, metavar="FILE",
                        help="YAML file of variables")
    parser.add_argument("--allow-host-paths", action="store_true",
                        help="let files and includes point outside the recipe's folder")
    parser.add_argument("--allow-env", action="append", default=[], metavar="NAME",
                        help="let the recipe's templates read this environment variable "
                        "with env() (besides those the recipe lists in env:)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="build", description="Build machine images from YAML recipes.",
                     epilog=_subcommands_help(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", type=Path, nargs="+", metavar="RECIPE",
                        help="the recipe(s) to build")
    parser.add_argument("-o", "--output-dir", type=Path,
                        help="where the images go (default: out/<recipe name>/); with several "
                        "recipes, each goes to DIR/<recipe name>/")
    parser.add_argument("-j", "--jobs", type=int, default=1,
                        help="with several recipes: how many to build at once")
    parser.add_argument("--format", help="comma-separated: raw,qcow2,vmdk,vhd "
                        "(default: the recipe's outputs.formats)")
    parser.add_argument("--cache-dir", type=Path, help="default: $XDG_CACHE_HOME/amiforge")
    parser.add_argument("--no-cache", action="store_true",
                        help="use no stage cache and no package cache: every stage runs from "
                        "scratch and nothing is kept for the next build")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the tools' output")
    parser.add_argument("--version", action="version", version=f"amiforge {__version__}")
    bundle = parser.add_argument_group("instance-store bundles (or ami.bundle in the recipe)")
    bundle.add_argument("--user-cert", type=Path, help="your X.509 certificate (PEM)")
    bundle.add_argument("--user-key", type=Path, help="your RSA private key (PEM)")
    bundle.add_argument("--ec2-cert", type=Path, help="the EC2 certificate (PEM)")
    bundle.add_argument("--account-id", help="your 12-digit AWS account id")
    _common_recipe_args(parser)
    return parser


SUBCOMMAND_HELP = (
    ("validate RECIPE...", "check recipes and list every error (exit 0 or 2)"),
    ("plan RECIPE [--json]", "print the fully resolved plan"),
    ("schema [--app]", "print the JSON Schema of a recipe (or of an app file)"),
    ("boot IMAGE", "boot an image under QEMU (TCG) and wait for a login prompt"),
    ("audit IMAGE", "check any disk image for what must not ship in a shared AMI"),
    ("cache [--prune]", "show or prune the stage cache"),
    ("unbundle MANIFEST", "verify an instance-store bundle and restore its image"),
    ("publish OUTPUT_DIR", "upload a build, register the AMI and share it (AWS)"),
    ("share IMAGE_ID", "change who may launch an AMI (AWS)"),
    ("copy IMAGE_ID", "copy an AMI to other regions (AWS)"),
    ("deregister IMAGE_ID", "deregister an AMI, optionally with its snapshots (AWS)"),
)


def _subcommands_help() -> str:
    width = max(len(usage) for usage, _ in SUBCOMMAND_HELP)
    lines = [f"  build {usage:<{width}}  {text}" for usage, text in SUBCOMMAND_HELP]
    return "other commands (`build COMMAND --help` for each):\n" + "\n".join(lines)


def _bundle_keys(args: argparse.Namespace, loaded: Any) -> Any:
    """Bundle keys from the command line, else from ami.bundle (relative to the recipe)."""
    from builder.bundle import BundleKeys

    recipe_bundle = loaded.recipe.ami.bundle
    if loaded.recipe.ami.backing != "instance-store":
        return None

    def pick(option: Path | str | None, from_recipe: str | None, name: str) -> Any:
        if option is not None:
            return option
        if from_recipe is None:
            raise InputError(f"instance-store backing needs --{name.replace('_', '-')} "
                             f"(or ami.bundle.{name} in {loaded.path})")
        return from_recipe if name == "account_id" else loaded.base_dir / from_recipe

    keys = BundleKeys(
        user_cert=pick(args.user_cert, recipe_bundle.user_cert, "user_cert"),
        user_key=pick(args.user_key, recipe_bundle.user_key, "user_key"),
        ec2_cert=pick(args.ec2_cert, recipe_bundle.ec2_cert, "ec2_cert"),
        account_id=pick(args.account_id, recipe_bundle.account_id, "account_id"))
    keys.check()
    return keys


def _variables(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise InputError(f"--var {pair!r}: expected KEY=VALUE with KEY a plain name")
        out[key] = value
    return out


def _load_options(args: argparse.Namespace) -> LoadOptions:
    bad = [name for name in args.allow_env if not name.isidentifier()]
    if bad:
        raise InputError(f"--allow-env {bad[0][:40]!r}: not an environment variable name")
    return LoadOptions(variables=_variables(args.var), var_files=tuple(args.var_file),
                       allow_host_paths=args.allow_host_paths,
                       allow_env=frozenset(args.allow_env))


def _formats(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    from builder.stages.convert import EXTENSIONS

    formats = tuple(f.strip() for f in value.split(",") if f.strip())
    unknown = [f for f in formats if f not in EXTENSIONS]
    if unknown or not formats:
        raise InputError(f"--format: unknown format {', '.join(unknown) or value!r} "
                         f"(choose from {', '.join(EXTENSIONS)})")
    return formats


def cmd_build(argv: Sequence[str]) -> int:
    from builder.build import BuildOptions, build_image, default_cache_dir
    from builder.progress import Progress

    args = _build_parser().parse_args(argv)
    _logging(args.verbose)
    if len(args.recipes) > 1:
        return _build_many(args)
    from builder.overlay import enter_private_mount_namespace

    enter_private_mount_namespace()  # before any thread: layered trees mount in it
    args.recipe = args.recipes[0]
    formats = _formats(args.format)
    loaded = load_recipe(args.recipe, _load_options(args))
    plan = make_plan(loaded)
    output_dir = args.output_dir or Path("out") / args.recipe.stem
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    keys = _bundle_keys(args, loaded)
    progress = Progress()
    progress.say(f"==> building {plan.name} from {args.recipe} into {output_dir}/")
    options = BuildOptions(output_dir, cache_dir, formats, keys)
    result = build_image(loaded, plan, options, progress)
    total = sum(result.timings.values())
    progress.say(f"==> done in {total:.1f}s: " + ", ".join(
        f"{output_dir}/{a['path']}" for a in result.manifest["artifacts"]))
    if args.json:
        summary = {"status": "ok", "output_dir": str(output_dir),
                   "artifacts": result.manifest["artifacts"], "timings": result.timings}
        print(json.dumps(summary, indent=2, sort_keys=True))
    return EXIT_OK


def _build_many(args: argparse.Namespace) -> int:
    """Each recipe in a process of its own, ``-j`` at a time, sharing the cache."""
    from builder.parallel import Job, run_jobs

    if args.jobs < 1:
        raise InputError("-j/--jobs must be at least 1")
    stems = [r.stem for r in args.recipes]
    if len(set(stems)) != len(stems):
        raise InputError("several recipes with the same file name would share an output "
                         "directory; rename one")
    for recipe in args.recipes:  # bad input is reported before anything is built
        make_plan(load_recipe(recipe, _load_options(args)))
    shared = _passthrough(args)
    parent = args.output_dir or Path("out")
    jobs = [Job(r, parent / r.stem, [str(r), *shared, "--output-dir", str(parent / r.stem),
                                     "--json"]) for r in args.recipes]
    return run_jobs(jobs, args.jobs)


def _passthrough(args: argparse.Namespace) -> list[str]:
    """The options every build of a ``-j`` run shares, as command-line arguments."""
    out: list[str] = []
    for value in args.var:
        out += ["--var", value]
    for path in args.var_file:
        out += ["--var-file", str(path)]
    for name in args.allow_env:
        out += ["--allow-env", name]
    for option in ("format", "cache_dir", "user_cert", "user_key", "ec2_cert", "account_id"):
        if getattr(args, option) is not None:
            out += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    flags = {"no_cache": "--no-cache", "verbose": "-v", "allow_host_paths": "--allow-host-paths"}
    out += [flag for option, flag in flags.items() if getattr(args, option)]
    return out


def cmd_validate(argv: Sequence[str]) -> int:
    parser = _Parser(prog="build validate", description="Check recipes; list every error.")
    parser.add_argument("recipes", type=Path, nargs="+")
    _common_recipe_args(parser)
    args = parser.parse_args(argv)
    failed = False
    for recipe in args.recipes:
        try:
            make_plan(load_recipe(recipe, _load_options(args)))
        except InputError as exc:
            failed = True
            for line in exc.lines():
                print(f"error: {line}", file=sys.stderr)
        else:
            print(f"{recipe}: ok")
    return EXIT_INPUT if failed else EXIT_OK


def cmd_plan(argv: Sequence[str]) -> int:
    parser = _Parser(prog="build plan", description="Print the fully resolved plan.")
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--json", action="store_true", help="JSON instead of YAML")
    _common_recipe_args(parser)
    args = parser.parse_args(argv)
    plan = make_plan(load_recipe(args.recipe, _load_options(args)))
    data = plan.to_dict()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=True, default_flow_style=False), end="")
    return EXIT_OK


def cmd_schema(argv: Sequence[str]) -> int:
    parser = _Parser(prog="build schema", description="Print the recipe's JSON Schema.")
    parser.add_argument("--app", action="store_true", help="the schema of an app file")
    args = parser.parse_args(argv)
    print(json.dumps(json_schema(app=args.app), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_boot(argv: Sequence[str]) -> int:
    from builder.vm import LOGIN_PROMPT, VirtualMachine

    parser = _Parser(prog="build boot", description="Boot an image under QEMU (TCG) on a "
                     "throw-away overlay and wait for a login prompt on the serial console.")
    parser.add_argument("image", type=Path)
    parser.add_argument("--firmware", choices=("bios", "uefi"), default="bios")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--pattern", default=LOGIN_PROMPT)
    parser.add_argument("--console", action="store_true", help="print the console log")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        raise InputError(f"{args.image}: image not found")
    with VirtualMachine(args.image, args.firmware) as vm:
        try:
            seconds = vm.wait_for(args.pattern, args.timeout)
        finally:
            if args.console:
                print(vm.console())
    print(f"BOOT OK {seconds:.1f}")
    return EXIT_OK


def cmd_unbundle(argv: Sequence[str]) -> int:
    from builder.unbundle import unbundle

    parser = _Parser(prog="build unbundle", description="Verify an instance-store bundle "
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
    from builder.cache import StageCache
    from builder.recipe.sizes import SizeError, parse_size

    parser = _Parser(prog="build cache", description="Show or prune the stage cache.")
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


def cmd_audit(argv: Sequence[str]) -> int:
    from builder.audit.checks import run_checks
    from builder.audit.report import errors, table
    from builder.audit.views import GuestView
    from builder.vm import image_format

    parser = _Parser(prog="build audit", description="Check a disk image (raw, qcow2, vmdk; "
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
    finally:
        view.close()
    if args.json:
        print(json.dumps({"image": str(args.image), "findings": [f.to_dict() for f in findings],
                          "errors": len(errors(findings))}, indent=2, sort_keys=True))
    else:
        print(table(findings))
    return EXIT_AUDIT_ERRORS if errors(findings) else EXIT_OK


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


def cmd_publish(argv: Sequence[str]) -> int:
    from builder.aws.lifecycle import publish

    parser = _Parser(prog="build publish", description="Upload a build's images (EBS "
                     "snapshots or an S3 bundle), register the AMI and share it.")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--bucket", help="S3 bucket for instance-store bundles")
    parser.add_argument("--workers", type=int, default=16, help="parallel block uploads")
    _aws_args(parser)
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise InputError("--workers must be at least 1")
    state = publish(args.output_dir, _aws(args), args.bucket, args.workers)
    if not args.dry_run:
        print(json.dumps(state, indent=2, sort_keys=True))
    return EXIT_OK


def cmd_share(argv: Sequence[str]) -> int:
    from builder.aws.lifecycle import share

    parser = _Parser(prog="build share", description="Change who may launch an AMI.")
    parser.add_argument("image_id")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--account", action="append", default=[], help="a 12-digit account id")
    who.add_argument("--public", action="store_true")
    who.add_argument("--private", action="store_true", help="remove every launch permission")
    _aws_args(parser)
    args = parser.parse_args(argv)
    bad = [a for a in args.account if not (len(a) == 12 and a.isdigit())]
    if bad:
        raise InputError(f"--account {bad[0]!r}: an AWS account id is 12 digits")
    share(args.image_id, _aws(args), args.account, args.public, args.private)
    return EXIT_OK


def cmd_copy(argv: Sequence[str]) -> int:
    from builder.aws.lifecycle import copy_image

    parser = _Parser(prog="build copy", description="Copy an AMI to other regions, with its "
                     "tags and launch permissions.")
    parser.add_argument("image_id")
    parser.add_argument("--to-region", action="append", required=True, dest="regions")
    _aws_args(parser)
    args = parser.parse_args(argv)
    copies = copy_image(args.image_id, _aws(args), args.regions)
    if copies:
        print(json.dumps(copies, indent=2, sort_keys=True))
    return EXIT_OK


def cmd_deregister(argv: Sequence[str]) -> int:
    from builder.aws.lifecycle import deregister

    parser = _Parser(prog="build deregister", description="Deregister an AMI.")
    parser.add_argument("image_id")
    parser.add_argument("--delete-snapshots", action="store_true")
    _aws_args(parser)
    args = parser.parse_args(argv)
    deregister(args.image_id, _aws(args), args.delete_snapshots)
    return EXIT_OK


AWS_COMMANDS = ("publish", "share", "copy", "deregister")
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "validate": cmd_validate,
    "plan": cmd_plan,
    "schema": cmd_schema,
    "boot": cmd_boot,
    "unbundle": cmd_unbundle,
    "cache": cmd_cache,
    "audit": cmd_audit,
    "publish": cmd_publish,
    "share": cmd_share,
    "copy": cmd_copy,
    "deregister": cmd_deregister,
}


def _logging(verbose: bool) -> None:
    """-v shows amiforge's own messages; other libraries' (sh, botocore) stay at warnings."""
    logging.basicConfig(format="    %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("amiforge").setLevel(logging.DEBUG if verbose else logging.WARNING)


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a tool killed by SIGPIPE reports


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # SIGINT and SIGTERM interrupt a build (cleanly), even where the parent started us with
    # SIGINT ignored, as shells do for background jobs.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    command = SUBCOMMANDS.get(argv[0]) if argv else None
    try:
        if command is not None and argv[0] in AWS_COMMANDS:
            from builder.aws.session import aws_errors

            with aws_errors():
                return command(argv[1:])
        if command is not None:
            return command(argv[1:])
        return cmd_build(argv)
    except BrokenPipeError:  # `build plan | head`: the reader has all it wanted
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("error: interrupted; temporary files were removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Interrupted:
        return EXIT_INTERRUPTED
    except RecipeError as exc:
        for line in exc.lines():
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except AmiforgeError as exc:
        lines = exc.lines()
        print(f"error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(line, file=sys.stderr)
        return exc.exit_code

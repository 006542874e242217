"""`build RECIPE...`, `build validate`, `build plan`, `build schema`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from builder import __version__
from builder.commands.args import Parser, configure_logging
from builder.errors import InputError
from builder.plan import make_plan
from builder.recipe.load import LoadOptions, load_recipe
from builder.recipe.model import json_schema

EXIT_OK, EXIT_INPUT = 0, 2


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
    parser = Parser(prog="build", description="Build machine images from YAML recipes.",
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
    ("diff A B", "what changed between two releases: packages, files, AMI (exit 0 or 1)"),
    ("cache [--prune]", "show or prune the stage cache"),
    ("unbundle MANIFEST", "verify an instance-store bundle and restore its image"),
    ("publish OUTPUT_DIR", "upload a build, register the AMI and share it (AWS)"),
    ("share IMAGE_ID", "change who may launch an AMI (AWS)"),
    ("copy IMAGE_ID", "copy an AMI to other regions (AWS)"),
    ("deregister IMAGE_ID", "deregister an AMI, optionally with its snapshots (AWS)"),
    ("launch IMAGE_ID", "run an instance of an AMI until its login prompt, then end it (AWS)"),
    ("verify-snapshot SNAP IMAGE", "compare a snapshot with an image, block for block (AWS)"),
)


def _subcommands_help() -> str:
    width = max(len(usage) for usage, _ in SUBCOMMAND_HELP)
    lines = [f"  build {usage:<{width}}  {text}" for usage, text in SUBCOMMAND_HELP]
    return "other commands (`build COMMAND --help` for each):\n" + "\n".join(lines)


def _bundle_keys(args: argparse.Namespace, loaded: Any) -> Any:
    """Bundle keys from the command line, else from ami.bundle (relative to the recipe)."""
    from builder.outputs.bundle import BundleKeys

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
    from builder.pipeline.progress import Progress

    args = _build_parser().parse_args(argv)
    configure_logging(args.verbose)
    if len(args.recipes) > 1:
        return _build_many(args)
    from builder.host.overlay import enter_private_mount_namespace

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
    result = build_image(plan, options, progress)
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
    parser = Parser(prog="build validate", description="Check recipes; list every error.")
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
    parser = Parser(prog="build plan", description="Print the fully resolved plan.")
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
    parser = Parser(prog="build schema", description="Print the recipe's JSON Schema.")
    parser.add_argument("--app", action="store_true", help="the schema of an app file")
    args = parser.parse_args(argv)
    print(json.dumps(json_schema(app=args.app), indent=2, sort_keys=True))
    return EXIT_OK

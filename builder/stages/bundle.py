"""Stage 6 (instance-store backing): the bundle of the raw disk (see builder.outputs.bundle)."""

from __future__ import annotations

from builder.errors import InputError
from builder.outputs.bundle import bundle_image
from builder.pipeline.runner import Context
from builder.plan import Plan


def wanted(plan: Plan) -> bool:
    return plan.ami.instance_store


def run_stage(ctx: Context) -> None:
    keys = ctx.extras["bundle_keys"]
    if keys is None:
        raise InputError("instance-store backing needs --user-cert, --user-key, --ec2-cert and "
                         "--account-id (or ami.bundle in the recipe)")
    bundle_image(ctx.input("disk") / "disk.raw", ctx.output, keys, ctx.plan)

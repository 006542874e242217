"""Stage 2: configure the root tree: system files from amiforge's templates, users, the
recipe's files, services, then the recipe's scripts; finally strip what must not ship."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from builder import __version__
from builder.audit.checks import run_checks
from builder.audit.views import TreeView
from builder.errors import BuildFailed
from builder.host import treepath
from builder.host.chroot import prepared_root, run_in_root
from builder.host.run import run
from builder.image.filesystem import clamp_times
from builder.outputs.manifest import installed_packages
from builder.outputs.sbom import package_facts
from builder.pipeline.runner import Context
from builder.plan import Plan
from builder.recipe.model import FileSpec, User
from builder.templates import render_template, templates_digest
from builder.tools import STAGE_FORMAT

HOST_KEY_UNIT = "amiforge-ssh-host-keys.service"
REPART_UNIT = "systemd-repart.service"
REPART_ROOT_TYPES = {"x86_64": "root-x86-64", "arm64": "root-arm64"}  # repart.d(5) names


# Plan fields the configured tree does not depend on.
NOT_CONFIGURE = ("formats", "qcow2_compress", "sbom_formats", "ami", "os", "recipe_path",
                 "description", "disk_size", "sources", "environment_read",
                 "audit_allow")  # waivers are applied when the build checks the facts


FACTS_FORMAT = 3  # bump when run_stage reports more or otherwise (2, 3: the SBOM facts)


def inputs(plan: Plan, extras: dict[str, Any]) -> dict[str, Any]:
    """What the configured tree depends on (besides the bootstrapped tree it starts from):
    the plan, amiforge's templates and the recipe's files."""
    data = {k: v for k, v in plan.to_dict().items() if k not in NOT_CONFIGURE}
    if not plan.reproducible:  # the build time only matters when it is fixed
        data.pop("source_date_epoch")
    mounts = [(v.label, v.mount_point, v.filesystem) for v in plan.data_volumes]  # fstab
    return {**data, "mounts": mounts, "templates": templates_digest(),
            "sources": plan.digests(plan.files), "amiforge": __version__,
            "format": STAGE_FORMAT, "facts": FACTS_FORMAT}


def run_stage(ctx: Context) -> dict[str, Any]:
    """Configure the tree; the facts later stages need: its packages and audit findings."""
    configure(ctx.plan, ctx.output)
    return {"packages": installed_packages(ctx.output), "sbom": package_facts(ctx.output),
            "audit": [f.to_dict() for f in run_checks(TreeView(ctx.output))]}


def configure(plan: Plan, tree: Path) -> None:
    write_system_files(plan, tree)
    with prepared_root(tree, plan.os.apt_auth):
        for user in plan.users:
            add_user(tree, user)
        for spec in plan.files:
            install_file(tree, spec, plan)
        enable_services(plan, tree)
        for index, script in enumerate(plan.scripts):
            run_script(tree, index, script.run)
    keep_grub_config(tree)
    scrub(tree)
    if plan.reproducible:  # atimes: the filesystem stage sets them in the image
        clamp_times(tree, plan.source_date_epoch, atimes=False)


def _write(tree: Path, dest: str, text: str, mode: int = 0o644) -> None:
    """amiforge's own files replace whatever the tree has there, a symlink included."""
    treepath.write_file(tree, dest, text, mode, replace_link=True)


def write_system_files(plan: Plan, tree: Path) -> None:
    esp, volumes = plan.partition("esp"), plan.data_volumes
    _write(tree, "/etc/hostname", plan.hostname + "\n")
    _write(tree, "/etc/hosts", render_template("hosts.j2", plan=plan))
    _write(tree, "/etc/fstab", render_template("fstab.j2", plan=plan, esp=esp, volumes=volumes))
    _write(tree, "/boot/grub/grub.cfg", render_template("grub.cfg.j2", plan=plan))
    # GRUB's own parser on the result: a value that broke the quoting fails the build
    # here, not as a GRUB prompt at boot.
    run(["grub-script-check", treepath.in_root(tree, "/boot/grub/grub.cfg")])
    _write(tree, f"/etc/apt/sources.list.d/{plan.os.distribution}.sources",
           render_template("apt-sources.j2", os=plan.os))
    treepath.remove(tree, "/etc/apt/sources.list")
    _write(tree, "/etc/systemd/network/50-dhcp.network",
           render_template("network-dhcp.network.j2", plan=plan))
    for volume in volumes:
        treepath.make_dirs(tree, volume.mount_point)
    if esp:
        treepath.make_dirs(tree, "/boot/efi")
    if plan.grow_root:
        _write(tree, "/etc/repart.d/50-root.conf", render_template(
            "repart-root.conf.j2", repart_type=REPART_ROOT_TYPES[plan.arch]))
    if treepath.in_root(tree, "/usr/sbin/sshd").exists():
        _write(tree, f"/etc/systemd/system/{HOST_KEY_UNIT}",
               render_template("ssh-host-keys.service.j2"))
        _write(tree, "/etc/ssh/sshd_config.d/50-amiforge.conf",
               render_template("sshd-hardening.conf.j2"))


def _ids(tree: Path, owner: str) -> tuple[int, int]:
    user, _, group = owner.partition(":")
    uid = _lookup(tree, "/etc/passwd", user, "user")
    gid = _lookup(tree, "/etc/group", group, "group") if group else _primary_gid(tree, user)
    return uid, gid


def _lookup(tree: Path, table: str, name: str, what: str, column: int = 2) -> int:
    """A numeric id from the image's /etc/passwd or /etc/group (as a script left them)."""
    for line in treepath.read_text(tree, table).splitlines():
        fields = line.split(":")
        if fields[0] == name and len(fields) > column and fields[column].isdigit():
            return int(fields[column])
        if fields[0] == name:
            raise BuildFailed(f"{table} in the image has a malformed entry for {name!r}")
    raise BuildFailed(f"{what} {name!r} does not exist in the image")


def _primary_gid(tree: Path, user: str) -> int:
    return _lookup(tree, "/etc/passwd", user, "user", column=3)


def _group_exists(tree: Path, name: str) -> bool:
    return any(line.split(":")[0] == name
               for line in treepath.read_text(tree, "/etc/group").splitlines())


def useradd_argv(user: User) -> list[str]:
    """useradd's argument list (a pure function: the fuzz tests check where values go)."""
    argv = ["useradd", "--create-home", "--user-group", f"--shell={user.shell}"]
    if user.groups:
        argv.append(f"--groups={','.join(user.groups)}")
    return [*argv, "--", user.name]


def systemctl_argv(action: str, units: list[str]) -> list[str]:
    return ["systemctl", action, "--", *units]


def add_user(tree: Path, user: User) -> None:
    """Create the user with a locked password; install its SSH keys and sudo rule."""
    for group in user.groups:
        if not _group_exists(tree, group):
            run_in_root(tree, ["groupadd", "--", group])
    run_in_root(tree, useradd_argv(user))
    run_in_root(tree, ["passwd", "--lock", "--", user.name])
    uid, gid = _ids(tree, user.name)
    home = "/root" if user.name == "root" else f"/home/{user.name}"
    if user.ssh_authorized_keys:
        ssh_dir = treepath.make_dirs(tree, f"{home}/.ssh", mode=0o700)
        os.chown(ssh_dir, uid, gid, follow_symlinks=False)
        treepath.write_file(tree, f"{home}/.ssh/authorized_keys",
                            "".join(key.strip() + "\n" for key in user.ssh_authorized_keys),
                            mode=0o600, owner=(uid, gid))
    if user.sudo:
        _write(tree, f"/etc/sudoers.d/90-amiforge-{user.name}",
               render_template("sudoers.j2", user=user), mode=0o440)


def install_file(tree: Path, spec: FileSpec, plan: Plan,
                 accounts: Path | None = None) -> None:
    """Write one recipe file into ``tree``; owners are looked up in the ``accounts`` tree's
    /etc/passwd and /etc/group (default: ``tree`` itself)."""
    mode, owner = int(spec.mode, 8), _ids(accounts or tree, spec.owner)
    try:
        if spec.content is not None:
            treepath.write_file(tree, spec.dest, spec.content, mode, owner)
        else:  # templates were rendered into content when the recipe was loaded
            source = plan.source(str(spec.src))
            treepath.copy_in(tree, Path(source.path), spec.dest, mode, owner,
                             sha256=source.sha256)
    except BuildFailed as exc:
        raise BuildFailed(f"files: {exc}") from None


def enable_services(plan: Plan, tree: Path) -> None:
    enable = ["systemd-networkd.service", "systemd-resolved.service", *plan.services_enable]
    if treepath.in_root(tree, f"/etc/systemd/system/{HOST_KEY_UNIT}").exists():
        enable.append(HOST_KEY_UNIT)
    run_in_root(tree, systemctl_argv("enable", enable))
    if plan.grow_root:  # (Debian's systemd wants it there already: said for every release)
        run_in_root(tree, systemctl_argv("add-wants", ["sysinit.target", REPART_UNIT]))
    if plan.services_disable:
        run_in_root(tree, systemctl_argv("disable", list(plan.services_disable)))


def run_script(tree: Path, index: int, text: str) -> None:
    script = f"/tmp/amiforge-script-{index}.sh"
    treepath.write_file(tree, script, text if text.endswith("\n") else text + "\n",
                        replace_link=True)
    try:
        run_in_root(tree, ["/bin/sh", "-e", script])
    finally:
        treepath.remove(tree, script)


# Removed from every image; each folder is resolved inside the tree, then its entries
# matched by name.
SCRUB_GLOBS = (
    "/etc/ssh/ssh_host_*",
    "/var/lib/dbus/machine-id",
    "/var/lib/apt/lists/*",
    "/var/cache/apt/*.bin",
    "/var/cache/apt/archives/*.deb",
    "/var/cache/debconf/*-old",
    "/var/lib/dpkg/*-old",
    "/var/log/apt/*",
    "/var/log/dpkg.log",
    "/var/log/alternatives.log",
    "/var/log/bootstrap.log",
    "/root/.bash_history",
    "/tmp/*",
    "/var/tmp/*",
)


# grub2-common's kernel hooks (shim-signed pulls it in): on every kernel install they run
# update-grub, which writes Debian's default /boot/grub/grub.cfg over amiforge's, without
# the serial console or the recipe's kernel_cmdline. amiforge's boots /vmlinuz and
# /initrd.img, which the kernel packages keep current, so it needs no regeneration; the
# hooks are removed (conffiles: dpkg keeps them removed on upgrades).
UPDATE_GRUB_HOOKS = ("/etc/kernel/postinst.d/zz-update-grub",
                     "/etc/kernel/postrm.d/zz-update-grub")


def keep_grub_config(tree: Path) -> None:
    for hook in UPDATE_GRUB_HOOKS:
        treepath.remove(tree, hook)


def scrub(tree: Path) -> None:
    """Remove what must not ship in an image others launch: host keys, identities, caches,
    build logs. /etc/machine-id is emptied (systemd's first-boot convention). Folders are
    resolved inside the tree: a recipe's ``var/tmp -> /tmp`` link empties the image's /tmp,
    never the host's."""
    for pattern in SCRUB_GLOBS:
        for path in treepath.matching(tree, pattern):
            treepath.remove(tree, path)
    treepath.write_file(tree, "/etc/machine-id", "", mode=0o444, replace_link=True)

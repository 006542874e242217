"""Stage 2: configure the root tree: system files from amiforge's templates, users, the
recipe's files, services, then the recipe's scripts; finally strip what must not ship."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from builder.chroot import prepared_root, run_in_root
from builder.errors import BuildFailed
from builder.plan import Plan
from builder.recipe.model import FileSpec, User
from builder.stages.filesystem import clamp_times
from builder.templates import render_template

HOST_KEY_UNIT = "amiforge-ssh-host-keys.service"


def configure(plan: Plan, tree: Path, recipe_dir: Path) -> None:
    write_system_files(plan, tree)
    with prepared_root(tree):
        for user in plan.users:
            add_user(tree, user)
        for spec in plan.files:
            install_file(tree, spec, recipe_dir)
        enable_services(plan, tree)
        for index, script in enumerate(plan.scripts):
            run_script(tree, index, script.run)
    scrub(tree)
    if plan.reproducible:  # atimes: the filesystem stage sets them in the image
        clamp_times(tree, plan.source_date_epoch, atimes=False)


def _write(tree: Path, dest: str, text: str, mode: int = 0o644) -> None:
    path = tree / dest.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)


def write_system_files(plan: Plan, tree: Path) -> None:
    esp, volumes = plan.partition("esp"), plan.data_volumes
    _write(tree, "/etc/hostname", plan.hostname + "\n")
    _write(tree, "/etc/hosts", render_template("hosts.j2", plan=plan))
    _write(tree, "/etc/fstab", render_template("fstab.j2", plan=plan, esp=esp, volumes=volumes))
    _write(tree, "/boot/grub/grub.cfg", render_template("grub.cfg.j2", plan=plan))
    _write(tree, f"/etc/apt/sources.list.d/{plan.os.distribution}.sources",
           render_template("apt-sources.j2", os=plan.os))
    (tree / "etc/apt/sources.list").unlink(missing_ok=True)
    _write(tree, "/etc/systemd/network/50-dhcp.network",
           render_template("network-dhcp.network.j2", plan=plan))
    for volume in volumes:
        (tree / volume.mount_point.lstrip("/")).mkdir(parents=True, exist_ok=True)
    if esp:
        (tree / "boot/efi").mkdir(parents=True, exist_ok=True)
    if (tree / "usr/sbin/sshd").exists():
        _write(tree, f"/etc/systemd/system/{HOST_KEY_UNIT}",
               render_template("ssh-host-keys.service.j2"))
        _write(tree, "/etc/ssh/sshd_config.d/50-amiforge.conf",
               render_template("sshd-hardening.conf.j2"))


def _ids(tree: Path, owner: str) -> tuple[int, int]:
    user, _, group = owner.partition(":")
    uid = _lookup(tree / "etc/passwd", user, "user")
    gid = _lookup(tree / "etc/group", group, "group") if group else _primary_gid(tree, user)
    return uid, gid


def _lookup(table: Path, name: str, what: str) -> int:
    for line in table.read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise BuildFailed(f"{what} {name!r} does not exist in the image")


def _primary_gid(tree: Path, user: str) -> int:
    for line in (tree / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[3])
    raise BuildFailed(f"user {user!r} does not exist in the image")


def _group_exists(tree: Path, name: str) -> bool:
    return any(line.split(":")[0] == name
               for line in (tree / "etc/group").read_text().splitlines())


def add_user(tree: Path, user: User) -> None:
    """Create the user with a locked password; install its SSH keys and sudo rule."""
    for group in user.groups:
        if not _group_exists(tree, group):
            run_in_root(tree, ["groupadd", group])
    argv = ["useradd", "--create-home", "--user-group", "--shell", user.shell]
    if user.groups:
        argv += ["--groups", ",".join(user.groups)]
    run_in_root(tree, [*argv, user.name])
    run_in_root(tree, ["passwd", "--lock", user.name])
    uid, gid = _ids(tree, user.name)
    home = tree / ("root" if user.name == "root" else f"home/{user.name}")
    if user.ssh_authorized_keys:
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        keys = ssh_dir / "authorized_keys"
        keys.write_text("".join(key.strip() + "\n" for key in user.ssh_authorized_keys))
        keys.chmod(0o600)
        for path in (ssh_dir, keys):
            os.chown(path, uid, gid)
    if user.sudo:
        _write(tree, f"/etc/sudoers.d/90-amiforge-{user.name}",
               render_template("sudoers.j2", user=user), mode=0o440)


def install_file(tree: Path, spec: FileSpec, recipe_dir: Path,
                 accounts: Path | None = None) -> None:
    """Write one recipe file into ``tree``; owners are looked up in the ``accounts`` tree's
    /etc/passwd and /etc/group (default: ``tree`` itself)."""
    dest = tree / spec.dest.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.is_dir():
        raise BuildFailed(f"files: {spec.dest} is a symlink or directory in the image")
    if spec.content is not None:
        dest.write_text(spec.content)
    else:  # templates were rendered into content when the recipe was loaded
        shutil.copyfile(recipe_dir / str(spec.src), dest)
    dest.chmod(int(spec.mode, 8))
    os.chown(dest, *_ids(accounts or tree, spec.owner))


def enable_services(plan: Plan, tree: Path) -> None:
    enable = ["systemd-networkd.service", "systemd-resolved.service", *plan.services_enable]
    if (tree / "etc/systemd/system" / HOST_KEY_UNIT).exists():
        enable.append(HOST_KEY_UNIT)
    run_in_root(tree, ["systemctl", "enable", *enable])
    if plan.services_disable:
        run_in_root(tree, ["systemctl", "disable", *plan.services_disable])


def run_script(tree: Path, index: int, text: str) -> None:
    script = tree / f"tmp/amiforge-script-{index}.sh"
    script.write_text(text if text.endswith("\n") else text + "\n")
    try:
        run_in_root(tree, ["/bin/sh", "-e", f"/tmp/amiforge-script-{index}.sh"])
    finally:
        script.unlink(missing_ok=True)


SCRUB_GLOBS = (
    "etc/ssh/ssh_host_*",
    "var/lib/dbus/machine-id",
    "var/lib/apt/lists/*",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/log/apt/*",
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/bootstrap.log",
    "root/.bash_history",
    "tmp/*",
    "var/tmp/*",
)


def scrub(tree: Path) -> None:
    """Remove what must not ship in an image others launch: host keys, identities, caches,
    build logs. /etc/machine-id is emptied (systemd's first-boot convention)."""
    for pattern in SCRUB_GLOBS:
        for path in tree.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    (tree / "etc/machine-id").write_text("")

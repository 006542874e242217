"""The audit's checks on small synthetic trees (the same checks run on images via guestfs)."""

from __future__ import annotations

import typing
from pathlib import Path

from builder.audit.checks import CHECKS, run_checks
from builder.audit.report import apply_waivers, errors
from builder.audit.views import TreeView
from builder.recipe.model import AuditCheck, Waiver


def write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def clean_tree(root: Path) -> Path:
    write(root, "/etc/machine-id", "")
    write(root, "/etc/shadow", "root:*:20000:0:99999:7:::\nadmin:!:20000::::::\n")
    write(root, "/etc/ssh/sshd_config.d/50-amiforge.conf", "PasswordAuthentication no\n")
    write(root, "/etc/ssh/sshd_config", "Include /etc/ssh/sshd_config.d/*.conf\n")
    write(root, "/usr/sbin/sshd", "ELF", 0o755)
    write(root, "/usr/bin/cloud-init", "#!/usr/bin/python3", 0o755)
    write(root, "/usr/bin/passwd", "ELF", 0o4755)
    write(root, "/var/lib/dpkg/info/passwd.list", "/usr/bin/passwd\n")
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    (root / "home/admin").mkdir(parents=True)
    return root


def found(root: Path) -> set[tuple[str, str, str]]:
    return {(f.check, f.severity, f.path) for f in run_checks(TreeView(root))}


def test_clean_tree_has_no_errors(tmp_path: Path) -> None:
    findings = run_checks(TreeView(clean_tree(tmp_path)))
    assert errors(findings) == []


def test_each_planted_problem_is_found(tmp_path: Path) -> None:
    root = clean_tree(tmp_path)
    write(root, "/etc/ssh/ssh_host_rsa_key", "key")
    write(root, "/etc/machine-id", "0123456789abcdef0123456789abcdef\n")
    write(root, "/etc/shadow", "root:$6$x$y:20000::::::\nguest::20000::::::\n")
    write(root, "/root/.ssh/authorized_keys", "ssh-ed25519 AAAA x\n")
    write(root, "/etc/ssh/sshd_config.d/50-amiforge.conf", "PermitRootLogin yes\n")
    write(root, "/home/admin/.bash_history", "ls\n")
    write(root, "/home/admin/.aws/credentials", "aws_secret_access_key = x\n")
    write(root, "/opt/app/server.key", "-----BEGIN EC PRIVATE KEY-----\n")
    write(root, "/usr/bin/open", "x", 0o777)
    write(root, "/usr/local/bin/suid", "x", 0o4755)
    write(root, "/etc/apt/apt.conf.d/01proxy", 'Acquire::http::Proxy "http://10.0.0.1:3128";\n')
    write(root, "/var/lib/apt/lists/deb.debian.org_Packages", "x")
    got = found(root)
    for expected in [
        ("ssh-host-keys", "error", "/etc/ssh/ssh_host_rsa_key"),
        ("machine-id", "error", "/etc/machine-id"),
        ("root-password", "error", "/etc/shadow"),
        ("empty-password", "error", "/etc/shadow"),
        ("root-authorized-keys", "error", "/root/.ssh/authorized_keys"),
        ("sshd-config", "error", "/etc/ssh/sshd_config"),
        ("shell-history", "error", "/home/admin/.bash_history"),
        ("cloud-credentials", "error", "/home/admin/.aws/credentials"),
        ("private-keys", "error", "/opt/app/server.key"),
        ("world-writable", "error", "/usr/bin/open"),
        ("unowned-setuid", "error", "/usr/local/bin/suid"),
        ("build-leftovers", "error", "/etc/apt/apt.conf.d/01proxy"),
        ("build-leftovers", "warning", "/var/lib/apt/lists"),
    ]:
        assert expected in got, expected
    assert ("unowned-setuid", "error", "/usr/bin/passwd") not in got
    assert not any(path == "/tmp" for _, _, path in got)  # sticky world-writable is fine


def test_waiver_turns_an_error_into_a_recorded_exception(tmp_path: Path) -> None:
    root = clean_tree(tmp_path)
    write(root, "/root/.bash_history", "x\n")
    findings, used, unused = apply_waivers(
        run_checks(TreeView(root)), [Waiver(check="shell-history", reason="training image"),
                                     Waiver(check="private-keys", reason="none any more")])
    assert errors(findings) == []
    assert used == [{"check": "shell-history", "reason": "training image"}]
    assert unused == [{"check": "private-keys", "reason": "none any more"}]


def test_recipe_check_names_are_the_audit_checks() -> None:
    assert set(typing.get_args(AuditCheck)) == set(CHECKS)


def test_aws_keys_anywhere_a_recipe_writes(tmp_path: Path) -> None:
    """A value read with env() can land in any file: the audit looks for key shapes in
    /etc, /home, /root, /opt and /srv, not only in credentials files."""
    root = clean_tree(tmp_path)
    write(root, "/etc/app.conf", "key = AKIAIOSFODNN7EXAMPLE\n")
    write(root, "/srv/deploy.env",
          "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
    write(root, "/usr/share/doc/x/example", "AKIAIOSFODNN7EXAMPLE\n")  # not a recipe's folder
    assert {p for c, s, p in found(root) if c == "cloud-credentials"} == {
        "/etc/app.conf", "/srv/deploy.env"}


def test_aws_keys_in_ami_tags() -> None:
    from builder.audit.checks import aws_keys_in_tags

    findings = aws_keys_in_tags({"team": "platform", "deployer": "ASIAIOSFODNN7EXAMPLE"})
    assert [(f.check, f.severity, f.path) for f in findings] == [
        ("cloud-credentials", "error", "ami.tags.deployer")]


def test_audit_command_prints_a_table_and_exits_3(tmp_path: Path, monkeypatch, capsys) -> None:
    """`build audit IMAGE` without --json: the table a person reads, exit 3 on errors. (The
    image is a planted tree here; tests/boot/test_audit.py audits real images through
    libguestfs, with --json.)"""
    from builder.audit import views
    from builder.commands.images import cmd_audit

    root = clean_tree(tmp_path / "root")
    write(root, "/etc/shadow", "root:*:20000:0:99999:7:::\nguest::20000:0:99999:7:::\n")
    image = tmp_path / "image.raw"
    image.write_bytes(b"")

    class PlantedImage(TreeView):
        def __init__(self, path: Path, fmt: str | None = None):
            assert path == image
            super().__init__(root)

        def close(self) -> None:
            pass

    monkeypatch.setattr(views, "GuestView", PlantedImage)
    assert cmd_audit([str(image)]) == 3
    out = capsys.readouterr().out
    assert "error    empty-password" in out and "user guest" in out
    assert out.rstrip().splitlines()[-1].startswith("1 error, ")

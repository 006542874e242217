"""The audit's checks. Each reads a View and yields findings with a severity and a path;
`error` findings fail a build (unless the recipe waives the check) and make `build audit`
exit 3. Check names are what a recipe's ``audit.allow`` refers to."""

from __future__ import annotations

import fnmatch
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from builder.audit.views import Node, View

ERROR, WARNING, INFO = "error", "warning", "info"
SYSTEM_PATHS = ("/usr/", "/etc/", "/boot/", "/opt/", "/bin/", "/sbin/", "/lib/", "/lib64/")
KEY_NAMES = ("id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "id_ecdsa_sk", "id_ed25519_sk",
             "*.pem", "*.key", "*.p12", "*.pfx", "*.ppk")
PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
CREDENTIALS = ("/.aws/credentials", "/.aws/config", "/.config/gcloud/credentials.db",
               "/.config/gcloud/application_default_credentials.json", "/.azure/accessTokens.json",
               "/.docker/config.json", "/.netrc", "/.git-credentials")
SECRET = re.compile(rb"aws_secret_access_key|\"auth\"\s*:|password|refresh_token|secret", re.I)
# An AWS access key id (long-term AKIA, temporary ASIA) or a secret key assignment: what a
# variable read with env() would leave behind in a file or a tag.
AWS_KEY = re.compile(rb"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b|aws_secret_access_key\s*[=:]\s*"
                     rb"[\"']?[A-Za-z0-9/+]{40}\b", re.I)
AWS_KEY_FOLDERS = ("/etc/", "/home/", "/root/", "/opt/", "/srv/")
HISTORY = ("*_history", ".histfile", ".lesshst", ".viminfo", ".python_history")


@dataclass(frozen=True)
class Finding:
    check: str
    severity: str
    path: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


Check = Callable[[View, list[Node]], Iterator[Finding]]
CHECKS: dict[str, Check] = {}


def check(name: str) -> Callable[[Check], Check]:
    def register(function: Check) -> Check:
        CHECKS[name] = function
        return function
    return register


def _text(view: View, path: str) -> str:
    data = view.read(path)
    return data.decode(errors="replace") if data else ""


def _homes(view: View) -> list[str]:
    return ["/root", *(f"/home/{n}" for n in view.listdir("/home"))]


@check("ssh-host-keys")
def ssh_host_keys(view: View, nodes: list[Node]) -> Iterator[Finding]:
    for name in view.listdir("/etc/ssh"):
        if fnmatch.fnmatch(name, "ssh_host_*_key"):
            yield Finding("ssh-host-keys", ERROR, f"/etc/ssh/{name}",
                          "SSH host key in the image: every instance would share it")


@check("machine-id")
def machine_id(view: View, nodes: list[Node]) -> Iterator[Finding]:
    if _text(view, "/etc/machine-id").strip():
        yield Finding("machine-id", ERROR, "/etc/machine-id",
                      "machine id is set: instances would share it (leave the file empty)")
    dbus = "/var/lib/dbus/machine-id"
    if not view.is_symlink(dbus) and _text(view, dbus).strip():
        yield Finding("machine-id", ERROR, dbus, "D-Bus machine id is set")


def _shadow(view: View) -> list[list[str]]:
    return [line.split(":") for line in _text(view, "/etc/shadow").splitlines()
            if line.count(":") >= 2]


@check("root-password")
def root_password(view: View, nodes: list[Node]) -> Iterator[Finding]:
    for fields in _shadow(view):
        if fields[0] == "root" and fields[1] and not fields[1].startswith(("!", "*")):
            yield Finding("root-password", ERROR, "/etc/shadow", "root has a password")


@check("empty-password")
def empty_password(view: View, nodes: list[Node]) -> Iterator[Finding]:
    for fields in _shadow(view):
        if fields[1] == "":
            yield Finding("empty-password", ERROR, "/etc/shadow",
                          f"user {fields[0]} has an empty password: anyone can log in")


@check("root-authorized-keys")
def root_authorized_keys(view: View, nodes: list[Node]) -> Iterator[Finding]:
    for name in ("authorized_keys", "authorized_keys2"):
        path = f"/root/.ssh/{name}"
        if _text(view, path).strip():
            yield Finding("root-authorized-keys", ERROR, path,
                          "root has authorized SSH keys baked into the image")


def _sshd_setting(view: View, option: str) -> tuple[str, str] | None:
    """sshd's first value wins; Debian includes sshd_config.d/*.conf at the top."""
    files = [f"/etc/ssh/sshd_config.d/{n}" for n in view.listdir("/etc/ssh/sshd_config.d")
             if n.endswith(".conf")] + ["/etc/ssh/sshd_config"]
    for path in files:
        for line in _text(view, path).splitlines():
            words = line.split()
            if len(words) >= 2 and words[0].lower() == option.lower():
                return path, words[1].lower()
    return None


@check("sshd-config")
def sshd_config(view: View, nodes: list[Node]) -> Iterator[Finding]:
    if not view.read("/usr/sbin/sshd", 1):
        return
    password = _sshd_setting(view, "PasswordAuthentication")
    if password is None or password[1] == "yes":
        yield Finding("sshd-config", ERROR, password[0] if password else "/etc/ssh/sshd_config",
                      "sshd allows password authentication")
    root = _sshd_setting(view, "PermitRootLogin")
    if root is not None and root[1] == "yes":
        yield Finding("sshd-config", ERROR, root[0], "sshd lets root log in with a password")


@check("shell-history")
def shell_history(view: View, nodes: list[Node]) -> Iterator[Finding]:
    for home in _homes(view):
        for name in view.listdir(home):
            if any(fnmatch.fnmatch(name, p) for p in HISTORY) and view.read(f"{home}/{name}", 1):
                yield Finding("shell-history", ERROR, f"{home}/{name}",
                              "shell or editor history left in the image")


@check("private-keys")
def private_keys(view: View, nodes: list[Node]) -> Iterator[Finding]:
    for node in nodes:
        name = node.path.rsplit("/", 1)[-1]
        in_home = node.path.startswith(("/root/", "/home/")) and node.size < 65536
        interesting = in_home or any(fnmatch.fnmatch(name, p) for p in KEY_NAMES)
        if node.is_file and interesting and node.size < (1 << 20):
            data = view.read(node.path) or b""
            if PRIVATE_KEY.search(data):
                yield Finding("private-keys", ERROR, node.path, "private key in the image")


@check("cloud-credentials")
def cloud_credentials(view: View, nodes: list[Node]) -> Iterator[Finding]:
    for home in _homes(view):
        for suffix in CREDENTIALS:
            data = view.read(home + suffix)
            if data and SECRET.search(data):
                yield Finding("cloud-credentials", ERROR, home + suffix,
                              "credentials file in the image")
    yield from aws_keys_in_files(view, nodes)


def aws_keys_in_files(view: View, nodes: list[Node]) -> Iterator[Finding]:
    """An AWS key anywhere in the folders a recipe writes to (not only credentials files)."""
    for node in nodes:
        wanted = node.is_file and node.path.startswith(AWS_KEY_FOLDERS) and node.size < 1 << 20
        if wanted and AWS_KEY.search(view.read(node.path) or b""):
            yield Finding("cloud-credentials", ERROR, node.path, "an AWS access key in the image")


def aws_keys_in_tags(tags: dict[str, str]) -> list[Finding]:
    """An AWS key in the AMI's tags (visible to everyone the AMI is shared with)."""
    return [Finding("cloud-credentials", ERROR, f"ami.tags.{key[:40]}",
                    "an AWS access key in an AMI tag")
            for key, value in sorted(tags.items())
            if AWS_KEY.search(f"{key}={value}".encode())]


@check("world-writable")
def world_writable(view: View, nodes: list[Node]) -> Iterator[Finding]:
    for node in nodes:
        if not node.path.startswith(SYSTEM_PATHS) or stat.S_ISLNK(node.mode):
            continue
        if node.mode & stat.S_IWOTH and not (node.is_dir and node.mode & stat.S_ISVTX):
            yield Finding("world-writable", ERROR, node.path,
                          f"world-writable {'folder' if node.is_dir else 'file'} in a system path")


def _packaged_files(view: View) -> set[str]:
    owned: set[str] = set()
    for name in view.listdir("/var/lib/dpkg/info"):
        if name.endswith(".list"):
            owned.update(_text(view, f"/var/lib/dpkg/info/{name}").splitlines())
    return owned


@check("unowned-setuid")
def unowned_setuid(view: View, nodes: list[Node]) -> Iterator[Finding]:
    special = [n for n in nodes if n.is_file and n.mode & (stat.S_ISUID | stat.S_ISGID)]
    if not special:
        return
    owned = _packaged_files(view)
    for node in special:
        # dpkg lists /bin/x even where /bin is a link to /usr/bin (merged /usr)
        aliases = {node.path, re.sub(r"^/usr/(s?bin|lib)/", r"/\1/", node.path)}
        if not aliases & owned:
            yield Finding("unowned-setuid", ERROR, node.path,
                          "setuid/setgid program that no package installed")


@check("build-leftovers")
def build_leftovers(view: View, nodes: list[Node]) -> Iterator[Finding]:
    lists = [n for n in view.listdir("/var/lib/apt/lists") if n not in ("lock", "partial")]
    if lists:
        yield Finding("build-leftovers", WARNING, "/var/lib/apt/lists",
                      f"{len(lists)} apt package lists left from the build")
    for folder in ("/tmp", "/var/tmp", "/var/cache/apt/archives"):
        leftovers = [n for n in view.listdir(folder) if n not in ("partial", "lock")]
        if leftovers:
            yield Finding("build-leftovers", WARNING, folder,
                          f"{len(leftovers)} files left: {', '.join(leftovers[:3])}")
    for path in ("/var/log/bootstrap.log", "/var/log/dpkg.log", "/var/log/apt/term.log"):
        if view.read(path, 1):
            yield Finding("build-leftovers", WARNING, path, "build log left in the image")
    for name in view.listdir("/etc/apt/apt.conf.d"):
        if re.search(rb"Acquire::\w+::Proxy", view.read(f"/etc/apt/apt.conf.d/{name}") or b""):
            yield Finding("build-leftovers", ERROR, f"/etc/apt/apt.conf.d/{name}",
                          "build-time apt proxy left in the image")
    if not view.is_symlink("/etc/resolv.conf") and "nameserver" in _text(view, "/etc/resolv.conf"):
        yield Finding("build-leftovers", WARNING, "/etc/resolv.conf",
                      "a fixed resolver configuration (build host's?) instead of DHCP's")


@check("first-boot-keys")
def first_boot_keys(view: View, nodes: list[Node]) -> Iterator[Finding]:
    if view.read("/usr/bin/cloud-init", 1):
        yield Finding("first-boot-keys", INFO, "/usr/bin/cloud-init",
                      "cloud-init injects SSH keys and makes host keys at first boot")
        return
    unit = "/etc/systemd/system/amiforge-ssh-host-keys.service"
    if view.read(unit, 1):
        yield Finding("first-boot-keys", INFO, unit, "host keys are made at first boot")
    yield Finding("first-boot-keys", WARNING, "/usr/bin/cloud-init",
                  "no first-boot key injection (cloud-init or equivalent): only keys baked "
                  "into the image can log in")


def run_checks(view: View) -> list[Finding]:
    nodes = list(view.walk())
    findings = [f for function in CHECKS.values() for f in function(view, nodes)]
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    return sorted(findings, key=lambda f: (order[f.severity], f.check, f.path))

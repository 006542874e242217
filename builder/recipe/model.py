"""The recipe's schema: typed, with defaults. pydantic validates it and reports the
location (key path) of every error; :mod:`builder.recipe.load` maps paths to lines."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from builder.aws.limits import ORGANIZATION_ARN_PATTERN, OU_ARN_PATTERN
from builder.recipe.sizes import SizeError, parse_size

SCHEMA_URL = "https://amiforge.dev/schema/recipe.json"


def _size(value: object) -> int:
    try:
        return parse_size(value)
    except SizeError as exc:
        raise PydanticCustomError("size", str(exc)) from None


Size = Annotated[
    int,
    BeforeValidator(_size),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1},
                              {"type": "string", "pattern": r"^\d+([KMGT](iB)?|B)?$"}],
                    "description": "bytes, or a number with a binary unit: 512MiB, 2GiB, 8G"}),
]


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise PydanticCustomError("path", f"{value[:40]!r} must be an absolute path in the image")
    if re.search(r"[\x00-\x1f\x7f]", value) or len(value) > 4096:
        raise PydanticCustomError("path", f"{value[:40]!r} may not hold control characters "
                                  "(newlines, tabs) and is at most 4096 characters")
    parts = value.split("/")
    if ".." in parts:
        raise PydanticCustomError("path", f"{value!r} may not contain '..'")
    return value


ImagePath = Annotated[str, AfterValidator(_absolute_path)]
# A mount point goes into /etc/fstab, whose fields are separated by white space.
MountPoint = Annotated[ImagePath, Field(pattern=r"^/[^\s\\]*$")]


def _file_mode(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        raise PydanticCustomError(
            "mode", "write file modes as quoted octal strings, e.g. \"0644\"")
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}|[0-7]{4}", value):
        raise PydanticCustomError("mode", f"{value!r} is not an octal file mode (try \"0644\")")
    return value


FileMode = Annotated[str, BeforeValidator(_file_mode),
                     WithJsonSchema({"type": "string", "pattern": "^[0-7]{3,4}$"})]
Name = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")]
# one OpenSSH line: no control characters nor the line breaks str.splitlines() sees
# (cloud-init splits keys so), which would make one key two
SSH_PUBLIC_KEY = r"^(ssh-|ecdsa-|sk-)\S+ \S+( [^\x00-\x1f\x7f\x85\u2028\u2029]*)?$"
# No leading "-": a unit name is a systemctl argument (passed after "--" as well).
UnitName = Annotated[str, Field(pattern=r"^[A-Za-z0-9@_:][A-Za-z0-9@._:-]*$", max_length=255)]
# One kernel parameter: no white space or control characters (GRUB's config quotes it).
KernelParameter = Annotated[str, Field(pattern=r"^[^\s\x00-\x1f\x7f]+$", max_length=1024)]
# A Debian suite or codename (bookworm, trixie, stable, bookworm-backports).
Suite = Annotated[str, Field(pattern=r"^[a-z][a-z0-9.-]{0,63}$")]
# A mirror URL: mmdebstrap's positional argument and the URIs: field of a deb822 file.
# no white space, quotes or control characters (they would end the sources line), no # or ?
# (a fragment or query would cut off the /dists/... amiforge and apt append)
MirrorUrl = Annotated[str, Field(pattern=r"^(https?|file)://[^\s\x00-\x1f\x7f'\"\\#?]+$",
                                 max_length=2048)]
Component = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,63}$")]
PackageName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.:=~-]*$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OS(Strict):
    distribution: Literal["debian"] = "debian"
    release: Suite | None = Field(
        None, description="codename (bookworm, trixie); default: the distribution's default")
    mirror: MirrorUrl | None = None
    security_mirror: MirrorUrl | None = Field(
        None, description="the security archive; default: the distribution's own")
    suites: list[Suite] | None = Field(
        None, min_length=1, max_length=8,
        description="suites to build from; default: RELEASE, RELEASE-updates and the "
                    "release's security suite")
    components: list[Component] | None = None
    kernel: PackageName | None = Field(
        None, description="kernel package; default: the distribution's cloud kernel")


class FileSpec(Strict):
    dest: ImagePath
    src: str | None = Field(None, description="file relative to the recipe's folder")
    content: str | None = None
    template: str | None = Field(None, description="Jinja2 template relative to the recipe")
    mode: FileMode = "0644"
    owner: str = Field("root:root", pattern=r"^[a-z_][a-z0-9_-]*(:[a-z_][a-z0-9_-]*)?$")

    @model_validator(mode="after")
    def _one_source(self) -> FileSpec:
        given = [k for k in ("src", "content", "template") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "file_source", "give exactly one of src, content or template (got {got})",
                {"got": ", ".join(given) or "none"})
        return self


class User(Strict):
    name: Name
    groups: list[Name] = []
    shell: ImagePath = "/bin/bash"
    ssh_authorized_keys: list[Annotated[str, Field(pattern=SSH_PUBLIC_KEY)]] = []
    sudo: bool = False


class Services(Strict):
    enable: list[UnitName] = []
    disable: list[UnitName] = []


class Script(Strict):
    run: str
    name: str | None = None


class AppRef(Strict):
    include: str
    vars: dict[str, Any] = {}


class RootVolume(Strict):
    size: Size = 2 << 30
    filesystem: Literal["ext4"] = "ext4"  # GRUB's config and the image builder are ext4-only
    boot: Literal["bios", "uefi", "hybrid"] = "hybrid"
    secure_boot: Annotated[bool, Field(description="boot UEFI through Debian's signed chain "
                                       "(shim, GRUB and kernel signed for Secure Boot); "
                                       "needs boot uefi or hybrid")] = False
    hostname: Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")] = "debian"
    grow: Annotated[bool, Field(description="on every boot, grow the root partition and "
                                "filesystem into free space after them (systemd-repart, "
                                "x-systemd.growfs): an EBS volume is usually larger than "
                                "the image")] = True
    kernel_cmdline: list[KernelParameter] = []
    packages: list[PackageName] = []
    files: list[FileSpec] = []
    users: list[User] = []
    services: Services = Services()
    scripts: list[Script] = []


class App(Strict):
    """A reusable unit in its own file: what it adds to the root volume."""

    description: str = ""
    vars: dict[str, Any] = {}
    packages: list[PackageName] = []
    files: list[FileSpec] = []
    users: list[User] = []
    services: Services = Services()
    scripts: list[Script] = []


class VolumeContent(Strict):
    filesystem: Literal["ext4", "xfs"] = "ext4"
    label: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,11}$")]
    mount_point: MountPoint | None = None
    files: list[FileSpec] = []


VolumeType = Literal["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"]


class Ebs(Strict):
    volume_size: int | None = Field(None, ge=1, description="GiB, as in AWS")
    volume_type: VolumeType = "gp3"
    iops: int | None = Field(None, ge=1)
    throughput: int | None = Field(None, ge=1, description="MiB/s (gp3 only)")
    delete_on_termination: bool = True
    encrypted: bool | None = None
    kms_key_id: str | None = None
    content: VolumeContent | None = None


class BlockDeviceMapping(Strict):
    device: Annotated[str, Field(pattern=r"^/dev/[a-z0-9]+$")]
    root: bool = False
    ebs: Ebs | None = None
    virtual_name: Annotated[str, Field(pattern=r"^ephemeral\d+$")] | None = None
    no_device: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> BlockDeviceMapping:
        kinds = [k for k, v in (("ebs", self.ebs), ("virtual_name", self.virtual_name),
                                ("no_device", self.no_device or None)) if v is not None]
        if len(kinds) != 1:
            raise PydanticCustomError(
                "bdm_kind", "give exactly one of ebs, virtual_name or no_device (got {got})",
                {"got": ", ".join(kinds) or "none"})
        return self


AccountId = Annotated[str, Field(pattern=r"^\d{12}$")]
SsmName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_./-]+$", max_length=1011)]


class LaunchPermissions(Strict):
    public: bool = False
    accounts: list[AccountId] = []
    organization_arns: list[Annotated[str, Field(pattern=ORGANIZATION_ARN_PATTERN)]] = []
    organizational_unit_arns: list[Annotated[str, Field(pattern=OU_ARN_PATTERN)]] = []


class Bundle(Strict):
    user_cert: str | None = None
    user_key: str | None = None
    ec2_cert: str | None = None
    account_id: AccountId | None = None


class UefiKeys(Strict):
    keys: Annotated[Literal["microsoft"], Field(description=(
        "enroll Microsoft's PK, KEKs and db certificates (what shim-signed needs): the "
        "instance boots with UEFI Secure Boot enforced"))]


CertificateFile = Annotated[str, Field(description="an X.509 certificate, PEM or DER, "
                                       "relative to the recipe")]


class UefiCertificateFiles(Strict):
    pk: CertificateFile = Field(description="the platform key's certificate")
    kek: Annotated[list[CertificateFile], Field(min_length=1)]
    db: Annotated[list[CertificateFile], Field(min_length=1)]
    dbx: list[CertificateFile] = Field([], description="revoked certificates")


class UefiCertificates(Strict):
    certificates: Annotated[UefiCertificateFiles, Field(description=(
        "enroll your own keys (PK, KEK, db, dbx): the instance boots with UEFI Secure "
        "Boot enforced, starting what your db signs"))]


def _uefi_data_kind(value: Any) -> str | None:
    """Which form of uefi_data a value is (a tagged union: one error, for that form)."""
    if isinstance(value, str):
        return "<blob>"
    for model, key in ((UefiKeys, "keys"), (UefiCertificates, "certificates")):
        if isinstance(value, model) or (isinstance(value, dict) and key in value):
            return f"<{key}>"
    return None


# field -> its tagged union's tags (dropped from error locations: they are no keys)
UNION_TAGS = {"uefi_data": ("<blob>", "<keys>", "<certificates>")}
UefiData = Annotated[
    Annotated[str, Tag("<blob>")] | Annotated[UefiKeys, Tag("<keys>")]
    | Annotated[UefiCertificates, Tag("<certificates>")],
    Discriminator(_uefi_data_kind, custom_error_type="uefi_data_form",
                  custom_error_message="must be a base64 blob, {keys: microsoft} or "
                  "{certificates: {pk, kek, db, dbx}}")]


class Ami(Strict):
    name: str | None = Field(None, description="AMI name; default: the recipe's name")
    description: str | None = None
    backing: Literal["ebs", "instance-store"] = "ebs"
    boot_mode: Literal["legacy-bios", "uefi", "uefi-preferred"] | None = None
    ena_support: bool = True
    sriov_net_support: Literal["simple"] | None = None
    tpm_support: Literal["v2.0"] | None = None
    imds_support: Literal["v2.0"] | None = "v2.0"
    uefi_data: UefiData | None = Field(None, description=(
        "the UEFI variable store instances start with: a base64 blob (RegisterImage's "
        "UefiData), or {keys: microsoft} or {certificates: {pk, kek, db, dbx}} for "
        "amiforge to make one"))
    tags: dict[str, str] = {}
    launch_permissions: LaunchPermissions = LaunchPermissions()
    share_snapshots: bool = Field(False, description=(
        "also let the launch_permissions' accounts (or everyone, when public) create volumes "
        "from the AMI's snapshots (createVolumePermission)"))
    deprecate_after: Annotated[str, Field(pattern=r"^[1-9][0-9]{0,3}d$")] | None = Field(
        None, description="deprecate the AMI and its copies this many days after publishing, "
        "e.g. 365d (AWS: at most 10 years; 2 years for a public AMI)")
    ssm_parameters: list[SsmName] = Field(
        [], description="SSM parameters that get the new AMI id (DataType aws:ec2:image), in "
        "the publish region and in each copy's region")
    bundle: Bundle = Bundle()


Format = Literal["raw", "qcow2", "vmdk", "vhd"]


class Qcow2Options(Strict):
    compress: bool = False


SbomFormat = Literal["spdx", "cyclonedx"]


class Outputs(Strict):
    formats: list[Format] = ["raw", "qcow2"]
    qcow2: Qcow2Options = Qcow2Options()
    sbom: Annotated[list[SbomFormat], Field(
        min_length=1, description="software bills of materials to write: sbom.spdx.json "
        "(SPDX 2.3, always: list spdx) and sbom.cdx.json (CycloneDX 1.6) beside it")] = ["spdx"]


AuditCheck = Literal["ssh-host-keys", "machine-id", "root-password", "empty-password",
                     "root-authorized-keys", "sshd-config", "shell-history", "private-keys",
                     "cloud-credentials", "world-writable", "unowned-setuid", "build-leftovers",
                     "first-boot-keys"]


class Waiver(Strict):
    check: AuditCheck
    reason: Annotated[str, Field(min_length=3)]


class Audit(Strict):
    allow: list[Waiver] = []


class Recipe(Strict):
    """A whole recipe as written (``extends`` already merged, templates rendered)."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"$id": SCHEMA_URL,
                                                 "title": "amiforge recipe"})

    name: str = Field(description="image name (Jinja2); also the AMI name by default")
    description: str = ""
    arch: Literal["x86_64", "arm64"] = "x86_64"
    vars: dict[str, Any] = {}
    extends: str | None = Field(None, description="a recipe this one inherits from")
    env: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        [], description="environment variables the recipe's templates may read with env()")
    os: OS = OS()
    root_volume: RootVolume = RootVolume()
    apps: list[AppRef] = []
    block_device_mappings: list[BlockDeviceMapping] = []
    ami: Ami = Ami()
    outputs: Outputs = Outputs()
    audit: Audit = Audit()


def json_schema(app: bool = False) -> dict[str, Any]:
    """The JSON Schema of a recipe (or of an app file), for editors and other tools."""
    model: type[BaseModel] = App if app else Recipe
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    if app:
        schema["properties"]["apps"] = {"type": "array",
                                        "items": {"$ref": "#/$defs/AppRef"}}
        schema.setdefault("$defs", {})["AppRef"] = AppRef.model_json_schema()
    return schema

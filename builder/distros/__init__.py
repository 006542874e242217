"""Distributions as small plugin classes, registered by subclassing (mkosi's idiom).

A distribution knows its releases (the one table of per-release facts), its default
release, mirrors and components, its cloud kernel per architecture, and the packages every
image needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Release:
    codename: str
    version: str
    security_suite: str   # the suite on the security archive
    repart_packages: tuple[str, ...] = ()  # systemd-repart, where systemd does not hold it

    def default_suites(self) -> tuple[str, ...]:
        """The release, its point-release updates and its security updates: an image
        built from these holds the newest packages the archive has."""
        return (self.codename, f"{self.codename}-updates", self.security_suite)


class Distribution:
    name: ClassVar[str]
    releases: ClassVar[dict[str, Release]]
    default_release: ClassVar[str]
    default_mirror: ClassVar[str]
    security_mirror: ClassVar[str]
    default_components: ClassVar[tuple[str, ...]] = ("main",)
    kernels: ClassVar[dict[str, str]]
    base_packages: ClassVar[tuple[str, ...]] = ("systemd-sysv", "udev", "systemd-resolved")
    # per architecture, what the image needs besides: arm64's GRUB modules (grub-mkimage
    # on the x86_64 host makes BOOTAA64.EFI from the image's own, matching its release)
    arch_packages: ClassVar[dict[str, tuple[str, ...]]] = {}
    signed_boot_packages: ClassVar[dict[str, tuple[str, ...]]] = {}
    registry: ClassVar[dict[str, type[Distribution]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        Distribution.registry[cls.name] = cls

    @classmethod
    def release(cls, codename: str | None) -> Release:
        return cls.releases[codename or cls.default_release]

    @classmethod
    def kernel_for(cls, arch: str) -> str:
        return cls.kernels[arch]

    @classmethod
    def debian_arch(cls, arch: str) -> str:
        return {"x86_64": "amd64", "arm64": "arm64"}[arch]


class Debian(Distribution):
    name = "debian"
    releases: ClassVar[dict[str, Release]] = {
        "bookworm": Release("bookworm", "12", "bookworm-security"),
        "trixie": Release("trixie", "13", "trixie-security", ("systemd-repart",)),
    }
    default_release = "trixie"
    default_mirror = "http://deb.debian.org/debian"
    security_mirror = "http://security.debian.org/debian-security"
    kernels: ClassVar[dict[str, str]] = {"x86_64": "linux-image-cloud-amd64",
                                         "arm64": "linux-image-cloud-arm64"}
    arch_packages: ClassVar[dict[str, tuple[str, ...]]] = {"arm64": ("grub-efi-arm64-bin",)}
    # Secure Boot: the signed shim and GRUB (their ESP files come from the image's tree),
    # whose kernels are signed too
    signed_boot_packages: ClassVar[dict[str, tuple[str, ...]]] = {
        "x86_64": ("shim-signed", "grub-efi-amd64-signed"),
        "arm64": ("shim-signed", "grub-efi-arm64-signed")}


def get(name: str) -> type[Distribution]:
    return Distribution.registry[name]

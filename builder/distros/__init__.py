"""Distributions as small plugin classes, registered by subclassing (mkosi's idiom).

A distribution knows its default release, mirror and components, its cloud kernel per
architecture, and the packages every image needs."""

from __future__ import annotations

from typing import ClassVar


class Distribution:
    name: ClassVar[str]
    default_release: ClassVar[str]
    default_mirror: ClassVar[str]
    default_components: ClassVar[tuple[str, ...]] = ("main",)
    kernels: ClassVar[dict[str, str]]
    base_packages: ClassVar[tuple[str, ...]] = ("systemd-sysv", "udev", "systemd-resolved")
    registry: ClassVar[dict[str, type[Distribution]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        Distribution.registry[cls.name] = cls

    @classmethod
    def kernel_for(cls, arch: str) -> str:
        return cls.kernels[arch]

    @classmethod
    def debian_arch(cls, arch: str) -> str:
        return {"x86_64": "amd64", "arm64": "arm64"}[arch]


class Debian(Distribution):
    name = "debian"
    default_release = "bookworm"
    default_mirror = "http://deb.debian.org/debian"
    kernels: ClassVar[dict[str, str]] = {"x86_64": "linux-image-cloud-amd64",
                                         "arm64": "linux-image-cloud-arm64"}


class Ubuntu(Distribution):
    name = "ubuntu"
    default_release = "noble"
    default_mirror = "http://archive.ubuntu.com/ubuntu"
    default_components = ("main", "universe")
    kernels: ClassVar[dict[str, str]] = {"x86_64": "linux-image-virtual",
                                         "arm64": "linux-image-virtual"}


def get(name: str) -> type[Distribution]:
    return Distribution.registry[name]

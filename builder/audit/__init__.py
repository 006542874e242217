"""Shared-AMI hygiene: checks that find what must not ship in an image others launch.

The checks read a :class:`~builder.audit.views.View` of a filesystem: the finished tree
during a build, or any disk image through libguestfs (read-only) for ``build audit``."""

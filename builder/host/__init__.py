"""Helpers that touch the build host: the one place that starts programs (run), commands
inside a new root (chroot), layered trees (overlay), the output directory and workspace,
paths resolved inside a tree (treepath), file helpers, and the mirror's credentials."""

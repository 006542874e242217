"""Making images from trees: filesystems, the bootloader, data volumes."""

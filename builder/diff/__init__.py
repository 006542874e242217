"""`build diff A B`: what changed between two releases of an image (packages, kernel, files
of the root filesystem, AMI attributes, block device mappings, image size)."""

"""Table of bad recipes, each with the exact error it must produce: exit 2, file:line:col,
the key path, a message that says what is wrong, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.cli import main

# id -> (files, expected error lines). "recipe.yaml" is the recipe validated.
CASES: dict[str, tuple[dict[str, str], list[str]]] = {
    "yaml-syntax-unclosed-bracket": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  packages: [a, b\n"},
        ["recipe.yaml:4:1: YAML syntax error: while parsing a flow sequence expected ',' or ']', but got '<stream end>'"]),
    "yaml-syntax-bad-indent": (
        {"recipe.yaml": "name: xyz\n root_volume: {}\n"},
        ["recipe.yaml:2:13: YAML syntax error: mapping values are not allowed here"]),
    "yaml-tab": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n\tsize: 1\n"},
        ["recipe.yaml:3:1: YAML syntax error: while scanning for the next token found character '\\t' that cannot start any token"]),
    "duplicate-key": (
        {"recipe.yaml": "name: xyz\nname: y\n"},
        ["recipe.yaml:2:1: name: duplicate key (the mapping already has 'name' at line 1)"]),
    "not-a-mapping": (
        {"recipe.yaml": "- name: xyz\n"},
        ["recipe.yaml:1:1: a recipe must be a YAML mapping of keys"]),
    "missing-name": (
        {"recipe.yaml": "description: x\n"},
        ["recipe.yaml:1:1: name: required key is missing"]),
    "unknown-top-key": (
        {"recipe.yaml": "name: xyz\nrot_volume: {}\n"},
        ["recipe.yaml:2:1: rot_volume: unknown key 'rot_volume' (did you mean 'root_volume'?)"]),
    "unknown-nested-key": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  pacakges: [vim]\n"},
        ["recipe.yaml:3:3: root_volume.pacakges: unknown key 'pacakges' (did you mean 'packages'?)"]),
    "root-filesystem-not-ext4": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  filesystem: xfs\n"},
        ["recipe.yaml:3:15: root_volume.filesystem: must be 'ext4' (got 'xfs')"]),
    "unknown-key-no-suggestion": (
        {"recipe.yaml": "name: xyz\nos:\n  zzz: 1\n"},
        ["recipe.yaml:3:3: os.zzz: unknown key 'zzz' (known keys: distribution, release, mirror, security_mirror, suites, components, kernel)"]),
    "size-with-space": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  size: 2 GB\n"},
        ["recipe.yaml:3:9: root_volume.size: '2 GB' is not a size (try 2GiB)"]),
    "size-decimal-unit": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  size: 4GB\n"},
        ["recipe.yaml:3:9: root_volume.size: '4GB' is not a size (try 4GiB)"]),
    "size-fraction": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  size: 1.5G\n"},
        ["recipe.yaml:3:9: root_volume.size: '1.5G' is not a size (try 2GiB)"]),
    "size-negative": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  size: -5\n"},
        ["recipe.yaml:3:9: root_volume.size: -5 is not a positive size"]),
    "size-bool": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  size: true\n"},
        ["recipe.yaml:3:9: root_volume.size: True is not a size (try 2GiB)"]),
    "bad-boot": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  boot: efi\n"},
        ["recipe.yaml:3:9: root_volume.boot: must be 'bios', 'uefi' or 'hybrid' (got 'efi')"]),
    "bad-arch": (
        {"recipe.yaml": "name: xyz\narch: amd64\n"},
        ["recipe.yaml:2:7: arch: must be 'x86_64' or 'arm64' (got 'amd64')"]),
    "packages-not-list": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  packages: vim\n"},
        ["recipe.yaml:3:13: root_volume.packages: must be a list (got a string)"]),
    "package-bad-name": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  packages: [Vim]\n"},
        ["recipe.yaml:3:14: root_volume.packages[0]: 'Vim' does not match the pattern ^[a-z0-9][a-z0-9+.:=~-]*$"]),
    "name-not-string": (
        {"recipe.yaml": "name: [a]\n"},
        ["recipe.yaml:1:7: name: must be a string (got a list)"]),
    "root-volume-not-mapping": (
        {"recipe.yaml": "name: xyz\nroot_volume: big\n"},
        ["recipe.yaml:2:14: root_volume: must be a mapping (got a string)"]),
    "file-relative-dest": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  files:\n    - {dest: etc/motd, content: hi}\n"},
        ["recipe.yaml:4:14: root_volume.files[0].dest: 'etc/motd' must be an absolute path in the image"]),
    "file-two-sources": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  files:\n    - {dest: /a, content: hi, src: f}\n",
         "f": "x"},
        ["recipe.yaml:4:7: root_volume.files[0]: give exactly one of src, content or template (got src, content)"]),
    "file-no-source": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  files:\n    - {dest: /a}\n"},
        ["recipe.yaml:4:7: root_volume.files[0]: give exactly one of src, content or template (got none)"]),
    "file-mode-unquoted": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  files:\n    - {dest: /a, content: x, mode: 644}\n"},
        ["recipe.yaml:4:36: root_volume.files[0].mode: write file modes as quoted octal strings, e.g. \"0644\""]),
    "file-mode-bad": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  files:\n    - {dest: /a, content: x, mode: \"0999\"}\n"},
        ["recipe.yaml:4:36: root_volume.files[0].mode: '0999' is not an octal file mode (try \"0644\")"]),
    "file-src-missing": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  files:\n    - {dest: /a, src: files/nope}\n"},
        ["recipe.yaml:4:23: root_volume.files[0].src: 'files/nope' not found (looked for files/nope)"]),
    "file-src-escape": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  files:\n    - {dest: /a, src: ../outside}\n",
         "../outside": "x"},
        ["recipe.yaml:4:23: root_volume.files[0].src: '../outside' is a path outside the recipe's folder (pass --allow-host-paths to allow)"]),
    "file-src-absolute": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  files:\n    - {dest: /a, src: /etc/passwd}\n"},
        ["recipe.yaml:4:23: root_volume.files[0].src: '/etc/passwd' is an absolute host path (pass --allow-host-paths to allow)"]),
    "undefined-variable": (
        {"recipe.yaml": "name: \"img-{{ version }}\"\n"},
        ["recipe.yaml:1:7: name: undefined variable: 'version' is undefined"]),
    "undefined-variable-nested": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  hostname: \"{{ host }}\"\n"},
        ["recipe.yaml:3:13: root_volume.hostname: undefined variable: 'host' is undefined"]),
    "template-syntax": (
        {"recipe.yaml": "name: \"img-{{ version \"\n"},
        ["recipe.yaml:1:7: name: template syntax error: unexpected end of template, expected 'end of print statement'."]),
    "template-sandbox": (
        {"recipe.yaml": "name: \"{{ ''.__class__.__mro__ }}\"\n"},
        ["recipe.yaml:1:7: name: not allowed in a template: access to attribute '__class__' of 'str' object is unsafe."]),
    "env-unset": (
        {"recipe.yaml": "name: \"img-{{ env('AMIFORGE_TEST_UNSET_VAR') }}\"\n"
                        "env: [AMIFORGE_TEST_UNSET_VAR]\n"},
        ["recipe.yaml:1:7: name: environment variable AMIFORGE_TEST_UNSET_VAR is not set (use env(\"AMIFORGE_TEST_UNSET_VAR\", \"default\") for a default)"]),
    "vars-not-mapping": (
        {"recipe.yaml": "name: xyz\nvars: [a]\n"},
        ["recipe.yaml:2:7: vars: must be a mapping of names to values"]),
    "extends-missing": (
        {"recipe.yaml": "extends: base.yaml\nname: xyz\n"},
        ["recipe.yaml:1:10: extends: base recipe 'base.yaml' not found"]),
    "extends-cycle": (
        {"recipe.yaml": "extends: a.yaml\nname: xyz\n", "a.yaml": "extends: b.yaml\n",
         "b.yaml": "extends: a.yaml\n"},
        ["a.yaml: extends: extends cycle: recipe.yaml -> a.yaml -> b.yaml -> a.yaml"]),
    "extends-self": (
        {"recipe.yaml": "extends: recipe.yaml\nname: xyz\n"},
        ["recipe.yaml: extends: extends cycle: recipe.yaml -> recipe.yaml"]),
    "app-missing": (
        {"recipe.yaml": "name: xyz\napps:\n  - include: apps/web.yaml\n", "apps/other": ""},
        ["recipe.yaml:3:14: apps[0].include: 'apps/web.yaml' not found (looked for apps/web.yaml)"]),
    "app-unknown-key": (
        {"recipe.yaml": "name: xyz\napps:\n  - include: app.yaml\n",
         "app.yaml": "packages: [nginx]\nservice: {enable: [nginx]}\n"},
        ["app.yaml:2:1: service: unknown key 'service' (did you mean 'services'?)"]),
    "app-cycle": (
        {"recipe.yaml": "name: xyz\napps:\n  - include: a.yaml\n",
         "a.yaml": "apps:\n  - include: b.yaml\n", "b.yaml": "apps:\n  - include: a.yaml\n"},
        ["b.yaml:2:14: apps[0].include: include cycle: a.yaml -> b.yaml -> a.yaml"]),
    "app-escape": (
        {"recipe.yaml": "name: xyz\napps:\n  - include: ../../etc/app.yaml\n"},
        ["recipe.yaml:3:14: apps[0].include: '../../etc/app.yaml' is a path outside the recipe's folder (pass --allow-host-paths to allow)"]),
    "bios-with-tpm": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  boot: bios\nami:\n  tpm_support: v2.0\n"},
        ["recipe.yaml:5:16: ami.tpm_support: NitroTPM needs ami.boot_mode 'uefi' (boot mode is 'legacy-bios', root_volume.boot is 'bios')"]),
    "bios-with-uefi-boot-mode": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  boot: bios\nami:\n  boot_mode: uefi\n"},
        ["recipe.yaml:5:14: ami.boot_mode: 'uefi' needs root_volume.boot uefi or hybrid (got 'bios')"]),
    "arm64-bios": (
        {"recipe.yaml": "name: xyz\narch: arm64\nroot_volume:\n  boot: bios\n"},
        ["recipe.yaml:4:9: root_volume.boot: arm64 images boot with UEFI only (got 'bios')"]),
    "ami-name-too-short": (
        {"recipe.yaml": "name: ab\n"},
        ["recipe.yaml:1:7: name: 'ab' is not a valid AMI name: 3-128 characters of letters, digits, spaces and ( ) [ ] . / - ' @ _"]),
    "ami-name-bad-chars": (
        {"recipe.yaml": "name: xyz\nami:\n  name: \"web:{{ arch }}\"\n"},
        ["recipe.yaml:3:9: ami.name: 'web:x86_64' is not a valid AMI name: 3-128 characters of letters, digits, spaces and ( ) [ ] . / - ' @ _"]),
    "account-id-short": (
        {"recipe.yaml": "name: xyz\nami:\n  launch_permissions:\n    accounts: ['12345']\n"},
        ["recipe.yaml:4:16: ami.launch_permissions.accounts[0]: '12345' does not match the pattern ^\\d{12}$"]),
    "bdm-two-kinds": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - {device: /dev/sdb, virtual_name: ephemeral0, no_device: true}\n"},
        ["recipe.yaml:3:5: block_device_mappings[0]: give exactly one of ebs, virtual_name or no_device (got virtual_name, no_device)"]),
    "bdm-bad-device": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - {device: /dev/hda, virtual_name: ephemeral0}\n"},
        ["recipe.yaml:3:14: block_device_mappings[0].device: /dev/hda is not a device name EC2 accepts (use /dev/sd[b-z] or /dev/xvd[b-z])"]),
    "bdm-duplicate-device": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - {device: /dev/sdb, virtual_name: ephemeral0}\n  - {device: /dev/sdb, virtual_name: ephemeral1}\n"},
        ["recipe.yaml:4:14: block_device_mappings[1].device: /dev/sdb is already mapped by entry 0"]),
    "bdm-ephemeral-24": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - {device: /dev/sdb, virtual_name: ephemeral24}\n"},
        ["recipe.yaml:3:38: block_device_mappings[0].virtual_name: ephemeral24: instance store volumes are ephemeral0 to ephemeral23"]),
    "bdm-root-device-name": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - {device: /dev/sdb, root: true, ebs: {volume_size: 8}}\n"},
        ["recipe.yaml:3:14: block_device_mappings[0].device: the root device must be /dev/xvda or /dev/sda1 (got /dev/sdb)"]),
    "bdm-root-too-small": (
        {"recipe.yaml": "name: xyz\nroot_volume: {size: 4GiB}\nblock_device_mappings:\n  - device: /dev/xvda\n    root: true\n    ebs: {volume_size: 2}\n"},
        ["recipe.yaml:6:24: block_device_mappings[0].ebs.volume_size: the root volume (2 GiB) is smaller than the image (root_volume.size is 4 GiB)"]),
    "bdm-io1-too-small": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - device: /dev/sdf\n    ebs: {volume_size: 2, volume_type: io1, iops: 100}\n"},
        ["recipe.yaml:4:24: block_device_mappings[0].ebs.volume_size: io1 volumes are 4-16384 GiB (got 2)"]),
    "bdm-io1-iops-ratio": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - device: /dev/sdf\n    ebs: {volume_size: 10, volume_type: io1, iops: 1000}\n"},
        ["recipe.yaml:4:52: block_device_mappings[0].ebs.iops: io1 allows at most 50 iops per GiB: 1000 iops needs at least 20 GiB (volume_size is 10)"]),
    "bdm-gp3-iops-range": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - device: /dev/sdf\n    ebs: {volume_size: 10, iops: 20000}\n"},
        ["recipe.yaml:4:34: block_device_mappings[0].ebs.iops: gp3 iops are 3000-16000 (got 20000)"]),
    "bdm-throughput-gp2": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - device: /dev/sdf\n    ebs: {volume_size: 10, volume_type: gp2, throughput: 200}\n"},
        ["recipe.yaml:4:58: block_device_mappings[0].ebs.throughput: throughput applies to gp3 only (got gp2)"]),
    "bdm-volume-type": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - device: /dev/sdf\n    ebs: {volume_size: 10, volume_type: gp4}\n"},
        ["recipe.yaml:4:41: block_device_mappings[0].ebs.volume_type: must be 'gp2', 'gp3', 'io1', 'io2', 'st1', 'sc1' or 'standard' (got 'gp4')"]),
    "bdm-kms-unencrypted": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - device: /dev/sdf\n    ebs: {volume_size: 10, kms_key_id: alias/k}\n"},
        ["recipe.yaml:4:40: block_device_mappings[0].ebs.kms_key_id: an empty volume's key is chosen at launch (RunInstances): RegisterImage takes no KmsKeyId",
         "recipe.yaml:4:40: block_device_mappings[0].ebs.kms_key_id: kms_key_id needs encrypted: true"]),
    "instance-store-too-big": (
        {"recipe.yaml": "name: xyz\nroot_volume: {size: 12GiB}\nami: {backing: instance-store}\n"},
        ["recipe.yaml:2:21: root_volume.size: instance-store images may be at most 10 GiB (got 12 GiB)"]),
    "aws-tag": (
        {"recipe.yaml": "name: xyz\nami:\n  tags: {'aws:owner': me}\n"},
        ["recipe.yaml:3:23: ami.tags.aws:owner: tag keys starting with 'aws:' are reserved by AWS"]),
    "deprecate-public-too-far": (
        {"recipe.yaml": "name: xyz\nami:\n  deprecate_after: 800d\n  launch_permissions: {public: true}\n"},
        ["recipe.yaml:3:20: ami.deprecate_after: AWS deprecates a public AMI at most 730 days ahead (got 800)"]),
    "deprecate-years": (
        {"recipe.yaml": "name: xyz\nami: {deprecate_after: 1y}\n"},
        ["recipe.yaml:2:24: ami.deprecate_after: '1y' does not match the pattern ^[1-9][0-9]{0,3}d$"]),
    "share-snapshots-with-an-ou": (
        {"recipe.yaml": "name: xyz\nami:\n  share_snapshots: true\n  launch_permissions: {organizational_unit_arns: ['arn:aws:organizations::123456789012:ou/o-abcdef1234/ou-ab12-cdef5678']}\n"},
        ["recipe.yaml:3:20: ami.share_snapshots: snapshots can be shared with accounts and made public, not with organizations or OUs"]),
    "share-snapshots-with-nobody": (
        {"recipe.yaml": "name: xyz\nami: {share_snapshots: true}\n"},
        ["recipe.yaml:2:24: ami.share_snapshots: no one to share with: ami.launch_permissions has no accounts and is not public"]),
    "ssm-reserved-name": (
        {"recipe.yaml": "name: xyz\nami:\n  ssm_parameters: [/AWS/images/latest]\n"},
        ["recipe.yaml:3:20: ami.ssm_parameters[0]: SSM parameter names may not begin with aws or ssm"]),
    "ssm-hierarchy-without-slash": (
        {"recipe.yaml": "name: xyz\nami:\n  ssm_parameters: [images/latest]\n"},
        ["recipe.yaml:3:20: ami.ssm_parameters[0]: not an SSM parameter name: letters, digits and _ . - with / between levels (a hierarchy starts with /, at most 15 levels)"]),
    "several-errors-at-once": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  size: big\n  boot: efi\n  pacakges: []\n"},
        ["recipe.yaml:3:9: root_volume.size: 'big' is not a size (try 2GiB)",
         "recipe.yaml:4:9: root_volume.boot: must be 'bios', 'uefi' or 'hybrid' (got 'efi')",
         "recipe.yaml:5:3: root_volume.pacakges: unknown key 'pacakges' (did you mean 'packages'?)"]),
    # --- hostile input: each a way a recipe from a pull request tried to reach the host ---
    "extends-host-file": (
        {"recipe.yaml": "extends: /etc/passwd\nname: xyz\n"},
        ["recipe.yaml:1:10: extends: '/etc/passwd' is an absolute host path (pass --allow-host-paths to allow)"]),
    "extends-outside": (
        {"recipe.yaml": "extends: ../../../etc/passwd\nname: xyz\n"},
        ["recipe.yaml:1:10: extends: '../../../etc/passwd' is a path outside the recipe's folder (pass --allow-host-paths to allow)"]),
    "env-not-allowed": (
        {"recipe.yaml": "name: \"img-{{ env('AWS_SECRET_ACCESS_KEY') }}\"\n"},
        ["recipe.yaml:1:7: name: env('AWS_SECRET_ACCESS_KEY') is not allowed: list AWS_SECRET_ACCESS_KEY in the recipe's env: or pass --allow-env AWS_SECRET_ACCESS_KEY"]),
    "env-app-cannot-widen": (
        {"recipe.yaml": "name: xyz\napps:\n  - include: app.yaml\n",
         "app.yaml": "env: [HOME]\nscripts:\n  - run: \"echo {{ env('HOME') }}\"\n"},
        ["app.yaml:1:1: env: unknown key 'env' (known keys: description, vars, packages, files, users, services, scripts)",
         "app.yaml:3:10: scripts[0].run: env('HOME') is not allowed: list HOME in the recipe's env: or pass --allow-env HOME"]),
    "release-option": (
        {"recipe.yaml": "name: xyz\nos: {release: \"--customize-hook=touch /pwned\"}\n"},
        ["recipe.yaml:2:15: os.release: '--customize-hook=touch /pwned' does not match the pattern ^[a-z][a-z0-9.-]{0,63}$"]),
    "mirror-newline": (
        {"recipe.yaml": "name: xyz\nos: {mirror: \"http://deb.debian.org/debian\\nTrusted: yes\"}\n"},
        ["recipe.yaml:2:14: os.mirror: 'http://deb.debian.org/debian\\nTrusted: ye'… does not match the pattern ^(https?|file)://[^\\s\\x00-\\x1f\\x7f'\\\"\\\\#?]+$"]),
    "mirror-option": (
        {"recipe.yaml": "name: xyz\nos: {mirror: \"--setup-hook=x\"}\n"},
        ["recipe.yaml:2:14: os.mirror: '--setup-hook=x' does not match the pattern ^(https?|file)://[^\\s\\x00-\\x1f\\x7f'\\\"\\\\#?]+$"]),
    "component-option": (
        {"recipe.yaml": "name: xyz\nos: {components: [main, \"-x\"]}\n"},
        ["recipe.yaml:2:25: os.components[1]: '-x' does not match the pattern ^[a-z][a-z0-9-]{0,63}$"]),
    "unit-option": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  services: {enable: [\"--root=/\"]}\n"},
        ["recipe.yaml:3:23: root_volume.services.enable[0]: '--root=/' does not match the pattern ^[A-Za-z0-9@_:][A-Za-z0-9@._:-]*$"]),
    "mount-point-space": (
        {"recipe.yaml": "name: xyz\nblock_device_mappings:\n  - device: /dev/sdf\n    ebs: {volume_size: 1, content: {label: d, mount_point: \"/srv/a b\"}}\n"},
        ["recipe.yaml:4:60: block_device_mappings[0].ebs.content.mount_point: '/srv/a b' does not match the pattern ^/[^\\s\\\\]*$"]),
    "cmdline-newline": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  kernel_cmdline: [\"quiet\\n}\\nmenuentry x {\"]\n"},
        ["recipe.yaml:3:20: root_volume.kernel_cmdline[0]: 'quiet\\n}\\nmenuentry x {' does not match the pattern ^[^\\s\\x00-\\x1f\\x7f]+$"]),
    "dest-newline": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  files: [{dest: \"/etc/a\\nb\", content: x}]\n"},
        ["recipe.yaml:3:18: root_volume.files[0].dest: '/etc/a\\nb' may not hold control characters (newlines, tabs) and is at most 4096 characters"]),
    "ssh-key-two-lines": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  users: [{name: a, ssh_authorized_keys: [\"ssh-ed25519 AAAA a\\nssh-rsa EVIL\"]}]\n"},
        ["recipe.yaml:3:43: root_volume.users[0].ssh_authorized_keys[0]: 'ssh-ed25519 AAAA a\\nssh-rsa EVIL' does not match the pattern ^(ssh-|ecdsa-|sk-)\\S+ \\S+( [^\\x00-\\x1f\\x7f\\x85\\u2028\\u2029]*)?$"]),
    "ssh-key-unicode-line-separator": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  users: [{name: a, ssh_authorized_keys: [\"ssh-ed25519 AAAA a\\u2028ssh-rsa EVIL\"]}]\n"},
        ["recipe.yaml:3:43: root_volume.users[0].ssh_authorized_keys[0]: 'ssh-ed25519 AAAA a\\u2028ssh-rsa EVIL' does not match the pattern ^(ssh-|ecdsa-|sk-)\\S+ \\S+( [^\\x00-\\x1f\\x7f\\x85\\u2028\\u2029]*)?$"]),
    "size-too-small": (
        {"recipe.yaml": "name: xyz\nroot_volume: {size: 1MiB}\n"},
        ["recipe.yaml:2:21: root_volume.size: 1MiB leaves no room for the hybrid layout and a root filesystem: at least 195MiB"]),
    "size-too-large": (
        {"recipe.yaml": "name: xyz\nroot_volume: {size: 99999999T}\n"},
        ["recipe.yaml:2:21: root_volume.size: at most 64TiB (an EBS volume's limit)"]),
    "src-directory": (
        {"recipe.yaml": "name: xyz\nroot_volume:\n  files: [{dest: /a, src: files}]\n", "files/x": "x"},
        ["recipe.yaml:3:27: root_volume.files[0].src: 'files' not a regular file (looked for files)"]),
    "long-key-not-echoed": (
        {"recipe.yaml": "name: xyz\n" + "k" * 100 + ": 1\n"},
        ["recipe.yaml:2:1: " + "k" * 40 + "…: unknown key '" + "k" * 40 + "'… (known keys: name, description, arch, vars, extends, env, os, root_volume, apps, block_device_mappings, ami, outputs, audit)"]),
    "huge-integer": (
        {"recipe.yaml": "name: xyz\nroot_volume: {size: " + "9" * 5000 + "}\n"},
        ["recipe.yaml: YAML value error: Exceeds the limit (4300 digits) for integer string conversion"]),
    "deep-nesting": (
        {"recipe.yaml": "name: xyz\nvars: {a: " + "[" * 3000 + "]" * 3000 + "}\n"},
        ["recipe.yaml: YAML nested too deeply"]),
    "nested-past-the-limit": (
        {"recipe.yaml": "name: xyz\nvars: {a: " + "[" * 80 + "]" * 80 + "}\n"},
        ["recipe.yaml:2:74: nested more than 64 levels deep"]),
    "alias-bomb": (
        {"recipe.yaml": "name: xyz\nvars:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n"
         + "".join(f"  {chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))},
        ["recipe.yaml: the document expands to more than 100000 values or 16777216 characters (YAML aliases?)"]),
    "template-recursion": (
        {"recipe.yaml": "name: \"{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}\"\n"},
        ["recipe.yaml:1:7: name: template error: recursion too deep"]),
    "template-range": (
        {"recipe.yaml": "name: \"{{ range(200000) | length }}\"\n"},
        ["recipe.yaml:1:7: name: template error: Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000)."]),
    "template-width-bomb": (
        {"recipe.yaml": "name: xyz\ndescription: \"{{ 'x' | center(400000000) }}\"\n"},
        ["recipe.yaml:2:14: description: template error: out of memory"]),
    "template-concat-bomb": (
        {"recipe.yaml": "name: xyz\ndescription: \"{% set a = 'x' * 1000000 %}{% set b = a~a~a~a~a~a~a~a %}{% set c = b~b~b~b~b~b~b~b %}{% set d = c~c~c~c~c~c~c~c %}{{ d | length }}\"\n"},
        ["recipe.yaml:2:14: description: template error: out of memory"]),
    "mirror-bad-port-with-credentials": (
        {"recipe.yaml": "name: xyz\nos: {mirror: \"http://user:s3cr3t@host:99999/debian\"}\n"},
        ["recipe.yaml:2:14: os.mirror: not a valid URL (host or port)"]),
    "mirror-credentials-not-echoed": (
        {"recipe.yaml": "name: xyz\nos: {mirror: \"http://u:s3cr3t@host/deb ian\"}\n"},
        ["recipe.yaml:2:14: os.mirror: 'http://***@host/deb ian' does not match the pattern ^(https?|file)://[^\\s\\x00-\\x1f\\x7f'\\\"\\\\#?]+$"]),
    "mirror-credentials-with-a-space-not-echoed": (
        {"recipe.yaml": "name: xyz\nos: {security_mirror: \"https://ci:tok en@host/x\"}\n"},
        ["recipe.yaml:2:23: os.security_mirror: 'https://***@host/x' does not match the pattern ^(https?|file)://[^\\s\\x00-\\x1f\\x7f'\\\"\\\\#?]+$"]),
    "mirror-fragment-cuts-the-path": (
        {"recipe.yaml": "name: xyz\nos: {mirror: \"file:///etc/shadow#\"}\n"},
        ["recipe.yaml:2:14: os.mirror: 'file:///etc/shadow#' does not match the pattern ^(https?|file)://[^\\s\\x00-\\x1f\\x7f'\\\"\\\\#?]+$"]),
    "mirror-user-without-password": (
        {"recipe.yaml": "name: xyz\nos: {mirror: \"https://TOKEN@host/debian\"}\n"},
        ["recipe.yaml:2:14: os.mirror: give the mirror's user name and password both (user:password@host)"]),
    "suite-of-another-release": (
        {"recipe.yaml": "name: xyz\nos: {release: bookworm, suites: [bookworm, trixie-security]}\n"},
        ["recipe.yaml:2:44: os.suites[1]: 'trixie-security' is not a suite of bookworm: bookworm, bookworm-backports, bookworm-proposed-updates, bookworm-security, bookworm-updates"]),
    "long-alias-not-echoed": (
        {"recipe.yaml": "name: xyz\ndescription: *" + "a" * 100 + "\n"},
        ["recipe.yaml:2:14: YAML syntax error: found undefined alias '" + "a" * 40 + "'…"]),
    "long-duplicate-key-not-echoed": (
        {"recipe.yaml": "name: xyz\n" + "k" * 60 + ": 1\n" + "k" * 60 + ": 2\n"},
        ["recipe.yaml:3:1: " + "k" * 40 + "…: duplicate key (the mapping already has '" + "k" * 40 + "'… at line 2)"]),
    "key-that-looks-like-a-union-tag": (
        {"recipe.yaml": "name: xyz\n\"<\": 1\n\"<keys>\": 2\n"},
        ["recipe.yaml:2:1: <: unknown key '<' (known keys: name, description, arch, vars, extends, env, os, root_volume, apps, block_device_mappings, ami, outputs, audit)",
         "recipe.yaml:3:1: <keys>: unknown key '<keys>' (known keys: name, description, arch, vars, extends, env, os, root_volume, apps, block_device_mappings, ami, outputs, audit)"]),
    "uefi-data-with-a-key-like-its-tag": (
        {"recipe.yaml": "name: xyz\nami:\n  boot_mode: uefi\n  uefi_data: {keys: microsoft, \"<keys>\": 1}\n"},
        ["recipe.yaml:4:32: ami.uefi_data.<keys>: unknown key '<keys>'"]),
    "uefi-data-with-legacy-bios": (
        {"recipe.yaml": "name: xyz\nami:\n  boot_mode: legacy-bios\n  uefi_data: QUJDRA==\n"},
        ["recipe.yaml:4:14: ami.uefi_data: needs ami.boot_mode 'uefi' (an instance that boots legacy-bios has no UEFI variables)",
         "recipe.yaml:4:14: ami.uefi_data: not an AWS UEFI variable store"]),
    "uefi-data-not-a-variable-store": (
        {"recipe.yaml": "name: xyz\nami:\n  boot_mode: uefi\n  uefi_data: QUJDRA==\n"},
        ["recipe.yaml:4:14: ami.uefi_data: not an AWS UEFI variable store"]),
    "sbom-without-spdx": (
        {"recipe.yaml": "name: xyz\noutputs:\n  sbom: [cyclonedx]\n"},
        ["recipe.yaml:3:9: outputs.sbom: must list spdx: every build writes sbom.spdx.json (write [spdx, cyclonedx] for both)"]),
    "template-string-bomb": (
        {"recipe.yaml": "name: \"{{ 'x' * 10**9 }}\"\n"},
        ["recipe.yaml:1:7: name: the result is too large"]),
}


@pytest.mark.parametrize("case", sorted(CASES), ids=sorted(CASES))
def test_bad_recipe(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    files, expected = CASES[case]
    work = tmp_path / "r"
    work.mkdir()
    for name, text in files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.chdir(work)
    monkeypatch.delenv("AMIFORGE_TEST_UNSET_VAR", raising=False)
    before = sorted(p.name for p in tmp_path.rglob("*"))

    assert main(["validate", "recipe.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {line}" for line in expected]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before



def test_secure_boot_needs_uefi(tmp_path) -> None:
    from builder.errors import RecipeError
    from builder.recipe.load import load_recipe
    from tests.conftest import copy_recipes

    recipes = copy_recipes(tmp_path / "recipes")
    for boot, arch, expected in (("bios", "x86_64", "needs boot uefi or hybrid"),
                                 ("hybrid", "x86_64", "needs ami.boot_mode 'uefi'"),
                                 ("bios", "arm64", "needs boot uefi or hybrid")):
        recipe = recipes / f"{boot}-{arch}.yaml"
        recipe.write_text(f"extends: debian-13-minimal.yaml\narch: {arch}\n"
                          f"root_volume: {{boot: {boot}, secure_boot: true}}\n")
        try:
            load_recipe(recipe)
        except RecipeError as exc:
            assert any(p.path == "root_volume.secure_boot" and expected in p.message
                       for p in exc.problems), exc.problems
        else:
            raise AssertionError(f"{boot} {arch}: no error")

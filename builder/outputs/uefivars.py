"""RegisterImage's UefiData: the UEFI variable store an instance of the AMI starts with, in
AWS's format (base64 of a compressed, checksummed variable list), written and read by
virt-firmware (its AWS varstore is based on Amazon's python-uefivars).

``{keys: microsoft}`` enrolls what PCs ship with: Microsoft's OEM platform key (PK), its
two KEKs (2011, 2023) and its db certificates (Windows and third-party UEFI CAs, 2011 and
2023: Debian's shim is signed by the "Microsoft Corporation UEFI CA 2011"), with a
placeholder dbx. With a PK enrolled the instance boots with Secure Boot enforced.
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/uefi-secure-boot-optionB.html"""

from __future__ import annotations

import base64
import struct
import tempfile
import zlib
from pathlib import Path

from virt.firmware.efi import efivar
from virt.firmware.varstore.aws import AwsVarStore

from builder.errors import InputError

SECURE_BOOT_VARIABLES = ("PK", "KEK", "db", "dbx")


def microsoft_keys() -> str:
    """The UefiData blob enrolling Microsoft's keys (the same bytes every time: the
    variables' timestamps come from the certificates)."""
    variables = efivar.EfiVarList()
    variables.enroll_platform_microsoft()
    variables.add_microsoft_keys("all")
    return AwsVarStore.base64_varstore(variables).decode()


def decoded(blob: str) -> dict[str, list[str]]:
    """Variable name -> the subjects of the certificates it holds (dbx's placeholder hash
    shows as "hash"), read back from a UefiData blob; a located error if it is not one."""
    try:
        data = base64.b64decode(blob, validate=True)
    except ValueError:
        raise InputError("ami.uefi_data: not base64") from None
    if len(data) < 16 or struct.unpack_from("<Q", data)[0] != AwsVarStore.MAGIC:
        raise InputError("ami.uefi_data: not an AWS UEFI variable store")
    with tempfile.TemporaryDirectory(prefix="amiforge-uefi-") as folder:
        path = Path(folder) / "uefi-data"
        path.write_text(blob)
        try:
            variables = AwsVarStore(str(path)).get_varlist()
        except (SystemExit, ValueError, KeyError, struct.error, zlib.error) as exc:
            # (the parser exits on a bad checksum)
            raise InputError(f"ami.uefi_data: not a valid AWS UEFI variable store "
                             f"({str(exc)[:80]})") from None
    return {name: [entry.x509.subject.rfc4514_string() if entry.x509 is not None else "hash"
                   for entry in (variable.sigdb or [])]
            for name, variable in sorted(variables.items())
            if name in SECURE_BOOT_VARIABLES}

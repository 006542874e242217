"""RegisterImage's UefiData: the UEFI variable store an instance of the AMI starts with, in
AWS's format (base64 of a compressed, checksummed variable list). virt-firmware makes the
signature lists and reads a store back; AWS's own tool (awslabs' python-uefivars) writes it.

``{keys: microsoft}`` enrolls what PCs ship with: Microsoft's OEM platform key (PK), its
two KEKs (2011, 2023) and its db certificates (Windows and third-party UEFI CAs, 2011 and
2023: Debian's shim is signed by the "Microsoft Corporation UEFI CA 2011"), with a
placeholder dbx. With a PK enrolled the instance boots with Secure Boot enforced.
``{certificates: {pk, kek, db, dbx}}`` enrolls the user's own X.509 certificates instead.
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/uefi-secure-boot-optionB.html"""

from __future__ import annotations

import base64
import struct
import tempfile
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pyuefivars.aws import AWSUEFIVarStore
from pyuefivars.varstore import UEFIVar, UEFIVarStore
from virt.firmware.efi import certs, efivar, guids
from virt.firmware.varstore.aws import AwsVarStore

from builder.errors import InputError
from builder.host.fsutil import read_regular_file

if TYPE_CHECKING:
    from builder.recipe.model import UefiCertificateFiles

SECURE_BOOT_VARIABLES = ("PK", "KEK", "db", "dbx")
# the signature owner of the certificates amiforge enrolls (AWS's example takes a random
# GUID; a fixed one keeps the blob reproducible)
OWNER = str(uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/amiforge/uefi-signature-owner"))
MAX_CERTIFICATE = 64 * 1024
# what Debian's shim-signed is signed with: a db without it refuses the boot chain
SHIM_SIGNER = "Microsoft Corporation UEFI CA 2011"


def shim_signer() -> bytes:
    """The DER bytes of SHIM_SIGNER's certificate (virt-firmware ships it)."""
    return x509.load_pem_x509_certificate(certs.load_cert(certs.MS_3RD_2011)).public_bytes(
        Encoding.DER)


def enrolls_platform_key(value: object) -> bool:
    """Whether recipe's uefi_data gives instances a PK, so that they enforce Secure Boot."""
    if value is None:
        return False
    if not isinstance(value, str):
        return True  # {keys: microsoft} and {certificates: ...} both enroll one
    try:
        return bool(decoded(value).get("PK"))
    except InputError:
        return False  # (the blob's own rule says why)


def microsoft_keys() -> str:
    """The UefiData blob enrolling Microsoft's keys."""
    variables = efivar.EfiVarList()
    variables.enroll_platform_microsoft()
    variables.add_microsoft_keys("all")
    return aws_blob(variables)


def aws_blob(variables: efivar.EfiVarList) -> str:
    """The Secure Boot variables as AWS's own tool writes them (awslabs' python-uefivars,
    which AWS's "Create the AWS binary blob" page runs as ``uefivars -i none -o aws --PK
    PK.esl ...``): time-based authenticated variables with an empty timestamp and digest,
    zlib-compressed with AWS's dictionary, checksummed, base64. virt-firmware makes the
    signature lists; this writes them the way the tool does (its own format conversion)."""
    store = UEFIVarStore()
    for name in SECURE_BOOT_VARIABLES:
        variable = variables.get(name)
        if variable is not None:
            store.vars.append(UEFIVar(name, bytes(variable.data), variable.guid.bytes_le,
                                      variable.attr))
    store.__class__ = AWSUEFIVarStore  # (how uefivars' main() turns a store into AWS's)
    return bytes(store).decode()


def read_certificate(path: Path) -> bytes:
    """The DER bytes of an X.509 certificate file, PEM or DER; ValueError if it is not."""
    data = read_regular_file(path, MAX_CERTIFICATE, "the file", ValueError)
    if data.count(b"-----BEGIN") > 1:
        raise ValueError("more than one PEM block: give each certificate its own file")
    load = x509.load_pem_x509_certificate if b"-----BEGIN" in data else \
        x509.load_der_x509_certificate
    return load(data).public_bytes(Encoding.DER)


def certificate_files(files: UefiCertificateFiles) -> list[tuple[str, int | None, str]]:
    """(variable, index in the recipe's list or None for pk, file) of each certificate."""
    return [("PK", None, files.pk)] + [
        (name, index, path) for name, paths in (("KEK", files.kek), ("db", files.db),
                                                ("dbx", files.dbx))
        for index, path in enumerate(paths)]


def certificate_store(files: UefiCertificateFiles, base_dir: Path) -> str:
    """The UefiData blob enrolling the recipe's certificates (files relative to
    ``base_dir``) in PK, KEK, db and dbx."""
    return enrolled([(name, read_certificate(base_dir / path))
                     for name, _, path in certificate_files(files)])


def enrolled(certificates: list[tuple[str, bytes]]) -> str:
    """The UefiData blob enrolling (variable, DER certificate) pairs, in order."""
    variables = efivar.EfiVarList()
    owner = guids.parse_str(OWNER)
    for name, der in certificates:
        variables.add_cert_prepare(name).sigdb_add_cert_data(owner, der)
    return aws_blob(variables)


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

"""Fixtures of the unit tier: bundle keys and the instance-store plan."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from builder.outputs.bundle import BundleKeys
from builder.plan import make_plan
from builder.recipe.load import LoadOptions, load_recipe
from tests.conftest import FIXED_EPOCH, RECIPES


def key_pair(directory: Path, name: str) -> tuple[Path, Path, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=3650)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, key


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("keys")
    user_cert, user_key, user_private = key_pair(directory, "user")
    ec2_cert, _, ec2_private = key_pair(directory, "ec2")
    return BundleKeys(user_cert, user_key, ec2_cert, "123456789012"), user_private, ec2_private


@pytest.fixture(scope="module")
def plan():
    return make_plan(load_recipe(RECIPES / "debian-12-instance-store.yaml",
                                 LoadOptions(source_date_epoch=FIXED_EPOCH)))

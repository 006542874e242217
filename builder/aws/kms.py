"""KMS keys as EBS takes them: StartSnapshot wants a key's ARN, CopyImage a key that exists
in the destination region, and both a key that can encrypt: enabled, symmetric, for
ENCRYPT_DECRYPT ("Amazon EBS does not support asymmetric encryption KMS keys",
https://docs.aws.amazon.com/ebs/latest/userguide/ebs-encryption.html)."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from builder.errors import InputError


def usable_key_arn(kms: Any, key: str, named: str) -> str:
    """The ARN of ``key`` (an id, alias, alias ARN or key ARN: DescribeKey takes all four),
    or a one-line error naming it as ``named`` says."""
    try:
        metadata = kms.describe_key(KeyId=key)["KeyMetadata"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code") or "not usable"
        raise InputError(f"{named}: {code} in {kms.meta.region_name}") from None
    problems = []
    if metadata.get("KeyState", "Enabled") != "Enabled":
        problems.append(f"its state is {metadata['KeyState']}")
    if metadata.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":
        problems.append(f"it is for {metadata['KeyUsage']}")
    if metadata.get("KeySpec", "SYMMETRIC_DEFAULT") != "SYMMETRIC_DEFAULT":
        problems.append(f"it is {metadata['KeySpec']} (EBS takes symmetric keys only)")
    if problems:
        raise InputError(f"{named}: EBS cannot encrypt with it: {'; '.join(problems)}")
    return str(metadata["Arn"])

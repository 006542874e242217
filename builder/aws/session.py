"""boto3 clients with the retry policy every call here wants, and --dry-run support."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from builder.errors import BuildFailed

# Adaptive retries: throttling, 5xx and dropped connections are retried with backoff and
# client-side rate limiting (botocore's own machinery, not a loop of ours).
RETRIES = Config(retries={"max_attempts": 12, "mode": "adaptive"},
                 max_pool_connections=64, connect_timeout=10, read_timeout=60)


@dataclass
class Aws:
    region: str | None = None
    endpoint_url: str | None = None
    dry_run: bool = False
    calls: list[str] = field(default_factory=list)
    _clients: dict[tuple[str, str | None], Any] = field(default_factory=dict, repr=False)

    def client(self, service: str, region: str | None = None) -> Any:
        """One client per service and region (made once: making one costs a good part of
        a second; boto3's clients are safe to share between threads)."""
        key = (service, region or self.region)
        if key not in self._clients:
            self._clients[key] = _session().client(
                service, region_name=key[1], endpoint_url=self.endpoint_url, config=RETRIES)
        return self._clients[key]

    def would(self, operation: str, **params: Any) -> None:
        """Record (and print) a call a dry run would make. Nothing secret is printed: the
        parameters are AMI and snapshot metadata."""
        shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
        line = f"would call {operation}({shown})"
        self.calls.append(line)
        print(line, file=sys.stdout)


@functools.cache
def _session() -> boto3.session.Session:
    """One boto3 session per process: each new one loads the service models from disk
    again (a good part of a second per client)."""
    return boto3.session.Session()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


@contextlib.contextmanager
def aws_errors() -> Iterator[None]:
    """AWS failures (after botocore's retries) as one-line build errors."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise BuildFailed(f"AWS {exc.operation_name}: {error.get('Code')}: "
                          f"{error.get('Message')}") from None
    except BotoCoreError as exc:
        raise BuildFailed(f"AWS: {exc}") from None

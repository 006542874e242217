"""Audit results: waivers from the recipe, the table a person reads, the JSON CI reads."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from builder.audit.checks import ERROR, Finding, aws_keys_in_tags
from builder.errors import BuildFailed

log = logging.getLogger("amiforge.audit")


def apply_waivers(findings: Sequence[Finding], allow: Sequence[Any]) -> tuple[
        list[Finding], list[dict[str, str]], list[dict[str, str]]]:
    """Errors the recipe waived become "waived"; returns the findings, the waivers that
    waived something, and those that matched nothing (a stale waiver is worth a warning:
    it would silently waive a future finding)."""
    reasons = {w.check: w.reason for w in allow}
    kept = [Finding(f.check, "waived", f.path, f.message) if f.check in reasons and
            f.severity == ERROR else f for f in findings]
    matched = {f.check for f in kept if f.severity == "waived"}
    used = [{"check": c, "reason": r} for c, r in reasons.items() if c in matched]
    unused = [{"check": c, "reason": r} for c, r in reasons.items() if c not in matched]
    return kept, used, unused


def errors(findings: Sequence[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == ERROR]


def table(findings: Sequence[Finding]) -> str:
    if not findings:
        return "no findings"
    width = max(len(f.check) for f in findings)
    lines = [f"{f.severity:<8} {f.check:<{width}}  {f.path}: {f.message}" for f in findings]
    counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    lines.append(", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items()))
    return "\n".join(lines)


def fail_on_errors(findings: Sequence[Finding]) -> None:
    found = errors(findings)
    if found:
        detail = "; ".join(f"{f.check} {f.path}" for f in found[:5])
        raise BuildFailed(f"the image fails the shared-AMI audit ({len(found)} errors: "
                          f"{detail}); fix the recipe or waive a check with audit.allow")


def audit_report(plan: Any, facts: dict[str, Any]) -> tuple[
        list[Finding], list[dict[str, str]], list[dict[str, str]]]:
    """The configured tree's findings (kept in the stage facts) and the AMI's tags, with
    the recipe's waivers applied: (findings, waivers used, waivers that matched nothing)."""
    found = [*(Finding(**f) for f in facts["audit"]), *aws_keys_in_tags(plan.ami.tags)]
    return apply_waivers(found, plan.audit_allow)


def check_audit(plan: Any, facts: dict[str, Any]) -> None:
    """Fail the build on an error the recipe did not waive; warn of stale waivers."""
    findings, _, unused = audit_report(plan, facts)
    for waiver in unused:
        log.warning("warning: audit waiver %r matched nothing; remove it from audit.allow",
                    waiver["check"])
    fail_on_errors(findings)

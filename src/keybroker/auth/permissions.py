"""Permissions (ISecL-style ``resource:action`` strings) and the built-in roles.

A token carries role names; what a role grants is looked up at every request (roles live in the database), so a
permission taken away from a role stops working for every token of that role at once.
"""

from __future__ import annotations

import re
from types import MappingProxyType

PERMISSIONS: frozenset[str] = frozenset(
    {
        "keys:create",
        "keys:search",
        "keys:retrieve",
        "keys:update",
        "keys:delete",
        "keys:certify",
        "keys:transfer",
        "key_transfer_policies:create",
        "key_transfer_policies:search",
        "key_transfer_policies:retrieve",
        "key_transfer_policies:update",
        "key_transfer_policies:delete",
        "appraisal_policies:create",
        "appraisal_policies:search",
        "appraisal_policies:retrieve",
        "appraisal_policies:update",
        "appraisal_policies:delete",
        "collateral:manage",
        "audit:read",
        "cluster:read",
        "backends:read",  # GET /kbs/v1/backends: checks every backend now (round trips to each KMS)
        "tokens:manage",
        "certificates:issue",
    }
)


def _all(prefix: str) -> frozenset[str]:
    return frozenset(p for p in PERMISSIONS if p.startswith(prefix + ":"))


_READ_POLICIES = frozenset({"key_transfer_policies:search", "key_transfer_policies:retrieve"})

BUILTIN_ROLES: MappingProxyType[str, frozenset[str]] = MappingProxyType(
    {
        "admin": PERMISSIONS,
        "key-manager": (_all("keys") - {"keys:transfer"}) | _READ_POLICIES,
        "policy-manager": _all("key_transfer_policies") | _all("appraisal_policies"),
        "auditor": frozenset(
            {
                "audit:read",
                "cluster:read",
                "keys:search",
                "keys:retrieve",
                "appraisal_policies:search",
                "appraisal_policies:retrieve",
            }
        )
        | _READ_POLICIES,
        "workload": frozenset({"keys:transfer"}),
    }
)

ADMIN_ROLE = "admin"  # fixed: every permission, restored by 'keybroker init --new-admin-token'
MANAGE_PERMISSION = "tokens:manage"  # at least one active token always grants it (RoleStore.refuse_lockout)

ROLE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
# A token's free permission context (the guide's PERMISSION="nginx,USA"): words without spaces or commas.
CONTEXT_VALUE = re.compile(r"^[!-+\--~]{1,128}$")  # printable ASCII without space or comma


def validate_permissions(values: list[str]) -> frozenset[str]:
    unknown = sorted(set(values) - PERMISSIONS)
    if unknown:
        raise ValueError(f"unknown permission(s): {', '.join(unknown)}")
    return frozenset(values)

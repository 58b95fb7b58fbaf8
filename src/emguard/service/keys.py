"""API keys per organisation: created by the provider (``emguard keys create ORG``), sent as Bearer tokens."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select

from emguard.errors import ConfigError
from emguard.service.db import ApiKey, Database, Organization

KEY_PREFIX = "sk-emg-"
_ORG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(db: Database, org_name: str) -> tuple[Organization, str]:
    """A new key for ``org_name`` (the organisation is created on its first key). The key itself is
    returned once and never stored."""
    if not _ORG_NAME.match(org_name):
        raise ConfigError(
            f"organisation name {org_name!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.session() as s:
        org = s.scalar(select(Organization).where(Organization.name == org_name))
        if org is None:
            org = Organization(name=org_name)
            s.add(org)
            s.flush()
        s.add(ApiKey(org_id=org.id, key_sha256=key_sha256(key), hint=key[: len(KEY_PREFIX) + 4]))
    return org, key


def organization_for(db: Database, key: str) -> Organization | None:
    """The organisation a (non-revoked) key belongs to, or None."""
    if not key.startswith(KEY_PREFIX):
        return None
    with db.session() as s:
        return s.scalar(
            select(Organization)
            .join(ApiKey, ApiKey.org_id == Organization.id)
            .where(ApiKey.key_sha256 == key_sha256(key), ApiKey.revoked.is_(False))
        )

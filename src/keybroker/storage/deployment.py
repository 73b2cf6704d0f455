"""The deployment's identity: one row, created by ``keybroker init``. Tokens, KMIP object names and token issuers
carry it, so that what belongs to another deployment is refused as such."""

from __future__ import annotations

from keybroker.storage.db import Database
from keybroker.storage.tables import DeploymentRow


def deployment_id(database: Database) -> str:
    with database.transaction() as session:
        row = session.get(DeploymentRow, 1)
        if row is None:
            raise RuntimeError("the database has no deployment id; run 'keybroker init'")
        return row.deployment_id

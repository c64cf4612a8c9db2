"""The store's catalog of service versions, its releases and the fleet's pointer.

Part of `coordinator.store.Store`. Registering is all or none and idempotent
(identical content: a no-op; changed content: refused). Releases are written by the
deployments part (`coordinator.store.deployments`) inside its transactions, through
the helpers here, as `coordinator.outcome` decides.
"""

from __future__ import annotations

import hashlib
import json
import time

from coordinator.records import Registered, Release
from coordinator.store.base import Table, transaction
from shared.errors import UserError
from shared.specs import ServiceVersion


def digest(spec: ServiceVersion) -> str:
    """Content digest of a service version (identical re-registration is a no-op)."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


class CatalogTable(Table):
    async def catalog(self) -> dict[tuple[str, str], ServiceVersion]:
        rows = await self._rows("SELECT spec FROM catalog")
        specs = [ServiceVersion.model_validate_json(r["spec"]) for r in rows]
        return {s.key: s for s in specs}

    @transaction
    async def register(self, versions: list[ServiceVersion]) -> list[Registered]:
        """Add `versions` all or none; identical ones are no-ops, changed ones refused."""
        known = {
            (r["name"], r["version"]): r["digest"]
            for r in await self._rows("SELECT name, version, digest FROM catalog")
        }
        results: list[Registered] = []
        new: list[ServiceVersion] = []
        for i, spec in enumerate(versions):
            existing = known.get(spec.key)
            if existing is None:
                new.append(spec)
                known[spec.key] = digest(spec)
                results.append(Registered(spec.name, spec.version, "added"))
            elif existing == digest(spec):
                results.append(Registered(spec.name, spec.version, "unchanged"))
            else:
                raise UserError(
                    f"versions[{i}]",
                    f"{spec.name} {spec.version} is already registered with different content; "
                    "versions are immutable: register a new version",
                )
        now = time.time()
        await self._db.executemany(
            "INSERT INTO catalog (name, version, spec, digest, registered_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [(s.name, s.version, s.model_dump_json(), digest(s), now) for s in new],
        )
        return results

    async def current_release(self) -> tuple[int | None, dict[str, str]]:
        rows = await self._rows("SELECT value FROM fleet WHERE key = 'current_release_id'")
        if not rows:
            return None, {}
        release_id = int(rows[0]["value"])
        return release_id, await self._release_services(release_id)

    async def releases(self) -> list[Release]:
        """Every release, newest first."""
        rows = await self._rows("SELECT * FROM releases ORDER BY id DESC")
        return [
            Release(r["id"], json.loads(r["services"]), r["state"], r["created_at"],
                    r["deployment_id"])
            for r in rows
        ]  # fmt: skip

    async def deployed_pairs(self) -> set[tuple[str, str]]:
        """Every (service, version) that is part of some release."""
        rows = await self._rows("SELECT services FROM releases")
        return {pair for r in rows for pair in json.loads(r["services"]).items()}

    async def _release_services(self, release_id: int) -> dict[str, str]:
        rows = await self._rows("SELECT services FROM releases WHERE id = ?", release_id)
        services: dict[str, str] = json.loads(rows[0]["services"])
        return services

    async def _add_release(self, services: dict[str, str], state: str, deployment_id: str) -> int:
        """A new numbered release (inside the caller's transaction)."""
        return await self._db.insert(
            "INSERT INTO releases (services, state, created_at, deployment_id) VALUES (?, ?, ?, ?)"
            " RETURNING id",
            json.dumps(services, sort_keys=True), state, time.time(), deployment_id,
        )  # fmt: skip

    async def _set_release_state(self, release_id: int, state: str) -> None:
        await self._db.execute("UPDATE releases SET state = ? WHERE id = ?", state, release_id)

    async def _set_fleet(self, release_id: int) -> None:
        """Point the fleet at `release_id` (inside the caller's transaction)."""
        await self._db.execute(
            "INSERT INTO fleet (key, value) VALUES ('current_release_id', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            str(release_id),
        )

"""`convostore migrate`: bring every store's backend schema to this version, once,
before sidecars serve from it (they only check the version; see
`drivers/postgres/schema.py`). The operator runs the same code when it reconciles a store.
"""

from __future__ import annotations

import asyncio
import sys

from .config import StoreConfig, load_config
from .drivers import open_driver
from .drivers.base import BackendMisconfigured, BackendUnavailable, Migrates
from .sections import ConfigError


async def migrate_store(store: StoreConfig) -> str:
    """One line saying what was done to the store's backend."""
    driver = open_driver(store)
    if not isinstance(driver, Migrates):
        return f"store {store.name!r} ({store.backend}): nothing to migrate"
    await driver.open()
    try:
        return f"store {store.name!r} ({store.backend}): {await driver.migrate()}"
    finally:
        await driver.close()


def run_migrate(config_paths: list[str]) -> int:
    """Exit 0 when every store is at this version, 1 when a backend could not be
    migrated (unreachable or refusing), 2 for an invalid config."""
    try:
        config = load_config(*config_paths)
    except ConfigError as exc:
        print(f"convostore migrate: invalid configuration: {exc}", file=sys.stderr)
        return 2
    failed = False
    for store in config.stores.values():
        try:
            print(asyncio.run(migrate_store(store)))
        except (BackendUnavailable, BackendMisconfigured) as exc:
            print(f"convostore migrate: store {store.name!r}: {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0

"""Child-process entry point: run the schema migrations with the administrator engine.

``python -m phiaudit.storage._migrate DATA_DIR DATABASE [STORAGE_POLICY]``. Used by
``migrate()`` before the restricted engine is opened in the service process (one engine per
process). The encrypted disk's key comes from the parent, in the environment.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from ._schema import SCHEMA_VERSION, migration_statements
    from ._store import open_admin_engine

    data_dir = Path(argv[0]).resolve()
    database = argv[1]
    policy = argv[2] if len(argv) > 2 and argv[2] else None
    # the disk key comes from the parent, in the environment; this process needs no KEK
    client = open_admin_engine(data_dir, database)
    for stmt in migration_statements(database, storage_policy=policy):
        client.command(stmt)
    done = client.query(f"SELECT count() FROM `{database}`.schema_migrations "
                        "WHERE version = {v:UInt32}", parameters={"v": SCHEMA_VERSION})
    if not done.result_rows[0][0]:
        client.insert(f"{database}.schema_migrations", [[SCHEMA_VERSION]],
                      column_names=["version"])
    client.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as exc:
        code = str(exc).split("\n", 1)[0][:200]
        print(f"migration error: {type(exc).__name__}: {code}", file=sys.stderr)
        sys.exit(1)

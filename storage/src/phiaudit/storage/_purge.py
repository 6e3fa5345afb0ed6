"""Child-process entry point: drop whole partitions with the administrator engine.

``python -m phiaudit.storage._purge DATA_DIR DATABASE TABLE:PARTITION_ID ...``. Only
``phiaudit retention purge`` calls it, after it has checked the six-year rule and the legal
holds and recorded the purge as an audit event; the service's own engine cannot drop anything.
Prints one JSON line: the partitions dropped.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PART = re.compile(r"^[A-Za-z0-9_-]+$")


def main(argv: list[str]) -> int:
    data_dir = Path(argv[0]).resolve()
    database = argv[1]
    targets = [a.split(":", 1) for a in argv[2:]]
    if not _NAME.match(database) or any(
            not _NAME.match(t) or not _PART.match(p) for t, p in targets):
        print("purge error: bad table or partition name", file=sys.stderr)
        return 2
    from ._store import open_admin_engine

    client = open_admin_engine(data_dir, database)
    dropped = []
    for table, partition in targets:
        client.command(f"ALTER TABLE `{database}`.`{table}` DROP PARTITION ID '{partition}'",
                       settings={"max_partition_size_to_drop": 0})
        dropped.append(f"{table}:{partition}")
    client.close()
    print(json.dumps({"dropped": dropped}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as exc:
        print(f"purge error: {type(exc).__name__}", file=sys.stderr)
        sys.exit(1)

"""The real phiaudit service over a store whose inserts can be made to fail: a test double.

``python -m tests.receiver.flaky_service DATA_DIR [--listen HOST:PORT] [--config FILE]``

Why a double: the embedded ClickHouse (chDB) cannot be made to fail for real from a test
(there is no server to stop, no disk to fill), yet the receiver's answer to a failing store
(UNAVAILABLE with RetryInfo, nothing acknowledged, no duplicates on retry, shedding when the
queue is full) must be tested. So this runs the real ``phiaudit.receiver.Service`` (real gRPC
server, real extraction, real encryption, real ``BatchWriter``, real chDB ``Store``) and wraps
only the store, through the service's ``store_factory`` parameter: every ``insert*`` method
of ``FlakyStore`` raises ``phiaudit.storage.StorageUnavailable`` while the flag file
``DATA_DIR/../fail-inserts`` exists, raises ``phiaudit.storage.PermanentError`` for table T
while ``DATA_DIR/../reject-T`` exists (ClickHouse refusing a block for good), and otherwise
calls the real ``Store`` method. Every other method is the real store's.

It writes the same ``run/service.json`` as ``phiaudit serve`` (the service does that itself)
and handles SIGTERM/SIGINT like ``phiaudit.receiver._service._serve``: stop taking requests,
flush, close, exit 0. Configuration errors exit 2 with one line, like ``phiaudit serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from phiaudit.receiver import load_config, serve_until_signalled
from phiaudit.storage import ConfigError, PermanentError, StorageUnavailable

FLAG_NAME = "fail-inserts"


def flag_path(data_dir: Path) -> Path:
    """The flag file that makes inserts fail, next to (not inside) the data directory."""
    return Path(data_dir).resolve().parent / FLAG_NAME


class FlakyStore:
    """Wraps a real ``Store``; every ``insert*`` method fails while the flag file exists.

    A test double (see the module docstring). Any method whose name starts with ``insert``
    (``insert``, ``insert_rows``, ...) is intercepted, so that the double keeps failing the
    writer's inserts whichever of them the writer uses; everything else is the real store's.
    """

    def __init__(self, store: Any, flag: Path) -> None:
        self._store = store
        self._flag = flag
        self.failed_inserts = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._store, name)
        if not name.startswith("insert") or not callable(real):
            return real

        def insert(table: str, *args: Any, **kwargs: Any) -> Any:
            if self._flag.exists():
                self.failed_inserts += 1
                raise StorageUnavailable(f"insert into {table}: injected failure (test double)")
            if self._flag.with_name(f"reject-{table}").exists():
                raise PermanentError(f"insert into {table}: injected rejection (test double)")
            return real(table, *args, **kwargs)

        return insert


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clickhouse_connect").setLevel(logging.ERROR)
    p = argparse.ArgumentParser(prog="flaky_service")
    p.add_argument("data_dir")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--config")
    args = p.parse_args(argv)
    try:
        config = load_config(args.config, {"data_dir": args.data_dir, "listen": args.listen})
    except ConfigError as exc:
        print(f"flaky_service: {exc}", file=sys.stderr)
        return 2
    flag = flag_path(Path(config.data_dir))
    asyncio.run(serve_until_signalled(config,
                                      store_factory=lambda store: FlakyStore(store, flag)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An embedded store per test module in the test process, opened exactly as the service opens
it: migrations by the admin engine in a child process, then the restricted engine here. chDB
opens one data directory per process at a time: every module closes its store at its end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from phiaudit.storage import (
    KeyRing,
    RecordEncoder,
    Store,
    StoreLocation,
    migrate,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store") / "data"


@pytest.fixture(scope="module")
def store(data_dir: Path) -> Iterator[Store]:
    loc = StoreLocation(data_dir=data_dir)
    migrate(loc)
    s = Store.open(loc)
    yield s
    s.close()


@pytest.fixture(scope="module")
def encoder(data_dir: Path) -> RecordEncoder:
    ring = KeyRing.open(data_dir)
    return RecordEncoder.for_ring(ring)

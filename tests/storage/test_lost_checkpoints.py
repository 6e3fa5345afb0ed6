"""A checkpoint row the engine does not keep is an error, so that the checkpointer keeps the
checkpoint pending and stores it again (chDB's streaming insert does not report a failed part
write: bench/README.md, session 9). The engine drops the row for real: a CHECK constraint,
added by the administrator engine in a child process, refuses one tree size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from phiaudit.storage import Store, StoreLocation, migrate
from phiaudit.storage._store import disk_key_env
from tests.storage.test_lost_inserts import _ADMIN_DDL


def test_a_checkpoint_row_the_engine_drops_is_an_error(tmp_path: Path) -> None:
    from phiaudit.storage import StorageUnavailable
    from phiaudit.storage._checkpoint import Checkpoint, load_checkpoints, store_checkpoint

    data_dir = tmp_path / "data"
    loc = StoreLocation(data_dir=data_dir)
    migrate(loc)
    # the engine drops every checkpoint row of tree size 7 (as it would on a full disk)
    check = (f"ALTER TABLE `{loc.database}`.checkpoints ADD CONSTRAINT no_seven "
             "CHECK tree_size != 7")
    env = dict(os.environ) | disk_key_env(data_dir)
    done = subprocess.run([sys.executable, "-c", _ADMIN_DDL, str(data_dir), loc.database, check],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-500:]
    store = Store.open(loc)
    try:
        def cp(size: int) -> Checkpoint:
            return Checkpoint("phiaudit/db/audit_events", "w1", size, bytes(32),
                              1_764_000_000_000_000 + size, "k1", b"\1" * 64)

        with pytest.raises(StorageUnavailable, match="did not keep the checkpoint"):
            store_checkpoint(store, cp(7))
        store_checkpoint(store, cp(8))
        store_checkpoint(store, cp(8))  # the same checkpoint again: stored once, no error
        assert [c.tree_size for c in load_checkpoints(store)] == [8]
    finally:
        store.close()

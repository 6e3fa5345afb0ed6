"""The service's configuration keys (the checkpointer's, the extraction threads) are validated
at start-up, with their key paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from phiaudit.receiver._config import ServiceConfig
from phiaudit.storage import ConfigError


def test_defaults_are_valid() -> None:
    cfg = ServiceConfig(data_dir="phiaudit-data")
    cfg.validate()
    assert cfg.checkpoint_interval_ms == 60_000 and cfg.checkpoint_events == 100_000
    assert cfg.checkpoint_heartbeat_ms == 3_600_000 and cfg.anchor_dir == ""


def test_every_bad_checkpoint_key_is_reported(tmp_path: Path) -> None:
    cfg = ServiceConfig(data_dir=str(tmp_path / "data"), checkpoint_interval_ms=0,
                        checkpoint_events=-1, checkpoint_heartbeat_ms=True,  # type: ignore[arg-type]
                        anchor_dir=str(tmp_path / "data" / "anchor"))
    with pytest.raises(ConfigError) as exc:
        cfg.validate()
    errors = "\n".join(exc.value.errors)
    for key in ("checkpoint_interval_ms", "checkpoint_events", "checkpoint_heartbeat_ms"):
        assert f"{key}: must be a positive integer" in errors
    assert "anchor_dir: must be outside the data directory" in errors
    ServiceConfig(data_dir=str(tmp_path / "data"),
                  anchor_dir=str(tmp_path / "elsewhere")).validate()


def test_extract_threads_default_is_one_more_than_the_cores() -> None:
    import os

    from phiaudit.receiver._service import extract_threads

    assert extract_threads(ServiceConfig(data_dir="d")) == (os.cpu_count() or 1) + 1
    assert extract_threads(ServiceConfig(data_dir="d", extract_threads=2)) == 2
    for bad in (0, -2, 65, True, "3"):
        with pytest.raises(ConfigError) as exc:
            ServiceConfig(data_dir="d", extract_threads=bad).validate()  # type: ignore[arg-type]
        assert "extract_threads: -1 (one more than the cores) or 1 to 64" in exc.value.errors

"""Security defaults of `phiaudit serve`: no plaintext listener off loopback, and a bad
configuration is refused at start-up (exit 2) with every error and its key path on one line,
never a traceback, and before anything is created on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("phiaudit: ")
    return lines[0]


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.10:4317"])
def test_refuses_plaintext_off_loopback(tmp_path: Path, listen: str) -> None:
    data = tmp_path / "data"
    res = run_cli("serve", "--data-dir", str(data), "--listen", listen, timeout=60)
    assert res.returncode == 2, res.stderr
    line = _one_line_error(res.stderr)
    assert "TLS" in line and "listen:" in line
    assert not data.exists()  # refused before anything was created


def test_bad_config_lists_every_error_with_its_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "max_queue_rows: -5\n"
        "batch_max_rows: 0\n"
        "batch_max_wait_ms: -1\n"
        "retry_after_ms: abc\n"
        "lsiten: 127.0.0.1:4317\n"          # a typo: unknown key
        "tls_key_file: /nonexistent/key.pem\n"
        "database: 42\n"                    # wrong type
        "sensitive_attributes: url.query\n"  # not a list
    )
    data = tmp_path / "data"
    res = run_cli("serve", "--data-dir", str(data), "--config", str(config), timeout=60)
    assert res.returncode == 2, res.stderr
    line = _one_line_error(res.stderr)
    for key in ("max_queue_rows:", "batch_max_rows:", "batch_max_wait_ms:", "retry_after_ms:",
                "lsiten: unknown key", "tls_cert_file/tls_key_file:", "tls_key_file: no such file",
                "database: must be a string", "sensitive_attributes:"):
        assert key in line, (key, line)
    assert not data.exists()


@pytest.mark.parametrize(("content", "expected"), [
    ("listen: [127.0.0.1\n  bad: : yaml\n", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
    ("listen: 4317\n", "listen: must be a string"),
])
def test_unreadable_config_is_one_clean_line(tmp_path: Path, content: str, expected: str) -> None:
    config = tmp_path / "phiaudit.yaml"
    config.write_text(content)
    res = run_cli("serve", "--data-dir", str(tmp_path / "data"), "--config", str(config),
                  timeout=60)
    assert res.returncode == 2, res.stderr
    assert expected in _one_line_error(res.stderr)


def test_missing_config_file_is_one_clean_line(tmp_path: Path) -> None:
    res = run_cli("serve", "--data-dir", str(tmp_path / "data"), "--config",
                  str(tmp_path / "absent.yaml"), timeout=60)
    assert res.returncode == 2, res.stderr
    assert "cannot read" in _one_line_error(res.stderr)

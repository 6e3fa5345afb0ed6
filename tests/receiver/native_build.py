"""Test builds of the compiled extension: a sanitized build of ``_native.c`` for the fuzz
tests, and loading such a build in place of the installed one (``NATIVE_TEST_SO``).

Shared by ``test_native`` / ``native_fuzz``, ``test_validate`` / ``validate_fuzz`` and
``test_native_block``. Imports nothing from ``phiaudit`` at import time: ``use_test_so`` must
run before anything imports ``phiaudit.receiver._fast``.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

SOURCE = (Path(__file__).resolve().parent.parent.parent
          / "receiver" / "src" / "phiaudit" / "receiver" / "_native.c")


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def sanitized_build(out_dir: Path, sanitizers: str) -> Path | None:
    """``_native.c`` built with ``-fsanitize=<sanitizers>`` (aborting on the first UBSan
    report) into ``out_dir``; None where that cannot be built here (no compiler or no
    sanitizer runtime: an extra check, not a requirement)."""
    cc = compiler()
    if not cc:
        return None
    out = out_dir / ("_native" + str(sysconfig.get_config_var("EXT_SUFFIX")))
    cmd = [*shlex.split(cc), "-O1", "-g", "-fPIC", "-shared", "-fno-omit-frame-pointer",
           f"-fsanitize={sanitizers}", "-fno-sanitize-recover=undefined",
           f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(out), "-lcrypto"]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out if proc.returncode == 0 else None


def use_test_so() -> None:
    """With ``NATIVE_TEST_SO`` set, make that file ``phiaudit.receiver._native`` (call it
    before anything imports ``phiaudit.receiver._fast``)."""
    path = os.environ.get("NATIVE_TEST_SO")
    if not path:
        return
    spec = importlib.util.spec_from_file_location("phiaudit.receiver._native", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["phiaudit.receiver._native"] = module


def require_native() -> Any:
    """The compiled extension module for a test that needs it: the test fails in CI
    (``CI=true``: CI must test the compiled path) and is skipped elsewhere when it is not
    built."""
    import pytest

    from phiaudit.receiver._fast import native_available

    ok, why = native_available()
    if not ok:
        reason = f"{why} (python receiver/build_native.py --check builds it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    from phiaudit.receiver import _native  # type: ignore[attr-defined]
    return _native

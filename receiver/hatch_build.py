"""Hatch build hook: compile the receiver's extractor (``_native.c``) into the wheel.

Without a C compiler or OpenSSL's headers the wheel is built without it (pure Python, with a
warning); the service then extracts every span in Python.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class NativeBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return  # editable installs: `make` builds it in place
        script = Path(self.root) / "receiver" / "build_native.py"
        spec = importlib.util.spec_from_file_location("phiaudit_build_native", script)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        why = mod.build()
        if why:
            print(f"phiaudit: building without the compiled extractor ({why})", file=sys.stderr)
            return
        out = mod.target()
        build_data["force_include"][str(out)] = f"phiaudit/receiver/{out.name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

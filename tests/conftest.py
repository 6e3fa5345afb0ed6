"""Shared fixtures: a real `phiaudit serve` on a free loopback port with its own data directory.

Every service runs in its own process (one chDB engine per process and per data directory),
exactly as users run it, and is stopped with SIGTERM; its exit code and its log are checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHIAUDIT_", "OTEL_"))}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phiaudit.receiver", *args], capture_output=True, text=True,
        timeout=timeout, env=env or cli_env(), input=input, check=False)


@dataclass
class RunningService:
    data_dir: Path
    proc: subprocess.Popen[str]
    address: str
    log_path: Path
    extra_args: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "credentials" / "admin.token").read_text().strip()

    def sql(self, query: str, *flags: str, token: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        env = cli_env(PHIAUDIT_TOKEN=self.admin_token if token is None else token)
        return run_cli("sql", "--data-dir", str(self.data_dir), *flags, query, env=env)

    def rows(self, query: str, decrypt: bool = False) -> list[dict[str, Any]]:
        flags = ["--format", "json"] + (["--decrypt"] if decrypt else [])
        res = self.sql(query, *flags)
        assert res.returncode == 0, res.stderr
        out: list[dict[str, Any]] = json.loads(res.stdout)
        return out

    def metrics(self) -> dict[str, int]:
        import grpc

        with grpc.insecure_channel(self.address) as ch:
            raw = ch.unary_unary("/phiaudit.v1.Query/Metrics")(b"{}", timeout=10)
        out: dict[str, int] = json.loads(raw)
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_service(data_dir: Path, *args: str, module: str = "phiaudit.receiver",
                  env: dict[str, str] | None = None, wait: float = 60) -> RunningService:
    data_dir.mkdir(parents=True, exist_ok=True)
    run_file = data_dir / "run" / "service.json"
    if run_file.exists():
        run_file.unlink()
    log_path = data_dir.parent / f"{data_dir.name}-service-{time.monotonic_ns()}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    cmd = [sys.executable, "-m", module]
    if module == "phiaudit.receiver":
        cmd += ["serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", *args]
    else:
        cmd += [str(data_dir), *args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=env or cli_env())
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}: {log_path.read_text()}")
        if run_file.exists():
            try:
                info = json.loads(run_file.read_text())
                if info.get("pid") == proc.pid:
                    return RunningService(data_dir, proc, info["address"], log_path, list(args))
            except ValueError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("service did not start in time")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[RunningService]:
    svc = start_service(tmp_path / "data")
    yield svc
    code = svc.stop()
    assert code == 0, svc.log()


def tracer_provider(address: str, service_name: str = "ehr-api") -> Any:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create(
        {"service.name": service_name, "host.name": "app-host-1"}))
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=address, insecure=True, timeout=30)))
    return provider

"""Infrastructure ingestion benchmark: storage saved by rollups, and records/s.

Run it from the repository root::

    .venv/bin/python bench/infra.py [--records N] [--rate R] [--phi-share F] [--clients C]

What it does:

1. builds a realistic mix of infrastructure log records, shaped as an OpenTelemetry Collector
   sends them (``ExportLogsServiceRequest``s of 1,000 records, ``phi.infra.kind`` on each
   record, the raw line or JSON as the body): by default 95% touch no PHI (VPC flows between
   application hosts and services in both directions, pgAudit reads of non-PHI tables by a few
   roles with varying literals, CloudTrail S3 reads of public assets) and 5% touch PHI
   (pgAudit reads of ``public.patients`` with a sqlcommenter ``traceparent``, CloudTrail
   GetObject of a PHI bucket, flows to the PHI database subnet). Event times advance at
   ``--rate`` records per second of event time (default 1,000/s: a mid-size deployment), so
   the rollups see as many records per minute as they would in production;
2. starts ``phiaudit serve`` (temporary data directory, a config file with the PHI catalog)
   twice, with ``rollup: true`` and with ``rollup: false`` (every record kept whole); sends
   all requests from ``--clients`` threads over raw gRPC (every request is acknowledged only
   once committed) and times first send to last acknowledgement;
3. stops the service, merges the parts (``OPTIMIZE TABLE ... FINAL``, so both runs are
   measured in the same state) and reads ``system.parts`` ``bytes_on_disk`` of
   ``infra_events`` and ``infra_rollups``;
4. prints the ratio (kept whole / rolled up) and records/s, writes
   ``bench/results/infra.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "infra.json"
EXPORT = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
PER_REQUEST = 1000

CONFIG = """
infra:
  phi_catalog:
    tables: ["public.patients", "public.observations", "clinical.*"]
    buckets: ["phi-exports", "ehr-backups/patients/"]
    endpoints: ["10.0.5.0/24:5432"]
  rollup: {rollup}
  sample_rate: 0
"""


# -- the records ---------------------------------------------------------------------------

class Mix:
    def __init__(self, rng: random.Random, phi_share: float) -> None:
        self.rng = rng
        self.phi_share = phi_share
        self.hosts = [f"10.0.1.{i}" for i in range(10, 60)]
        self.services = [("10.0.9.10", 443), ("10.0.9.11", 443), ("10.0.8.5", 6379),
                         ("10.0.8.6", 6379), ("10.0.7.20", 9092), ("10.0.6.30", 5432)]
        self.tables = ["public.invoices", "public.appointment_slots", "public.fee_schedule",
                       "public.feature_flags", "public.sessions"]
        self.roles = ["billing", "scheduler", "reporting", "ehr_app"]
        self.assets = [f"js/app.{i:03d}.js" for i in range(40)] + \
            [f"img/logo-{i}.png" for i in range(10)]

    def record(self, t_s: float) -> tuple[str, str]:
        """(kind, body) of one record at event time ``t_s``."""
        r = self.rng
        if r.random() < self.phi_share:
            return r.choice([self.pg_phi, self.ct_phi, self.flow_phi])(t_s)
        x = r.random()
        if x < 0.60:
            return self.flow(t_s)
        if x < 0.95:
            return self.pg_other(t_s)
        return self.ct_other(t_s)

    @staticmethod
    def _pg_time(t_s: float) -> str:
        return dt.datetime.fromtimestamp(t_s, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] \
            + " UTC"

    def flow(self, t_s: float, dst: tuple[str, int] | None = None) -> tuple[str, str]:
        r = self.rng
        host = r.choice(self.hosts)
        svc_addr, svc_port = dst or r.choice(self.services)
        eph = r.randint(32768, 60999)
        start = int(t_s)
        if r.random() < 0.5:
            src, dst_a, sp, dp = host, svc_addr, eph, svc_port
        else:  # the reply direction
            src, dst_a, sp, dp = svc_addr, host, svc_port, eph
        pk = r.randint(1, 400)
        action = "REJECT" if r.random() < 0.02 else "ACCEPT"
        return "vpcflow", (f"2 111122223333 eni-0{r.randint(0, 15):x}a1b2c3d4e5f6 {src} {dst_a} "
                           f"{sp} {dp} 6 {pk} {pk * r.randint(60, 1400)} {start} {start + 60} "
                           f"{action} OK")

    def flow_phi(self, t_s: float) -> tuple[str, str]:
        return self.flow(t_s, (f"10.0.5.{self.rng.randint(10, 12)}", 5432))

    def pg_other(self, t_s: float) -> tuple[str, str]:
        r = self.rng
        table = r.choice(self.tables)
        stmt = (f"SELECT * FROM {table} WHERE id = {r.randint(1, 10**6)} "
                f"AND updated_at > now() - interval '{r.randint(1, 30)} days'")
        return "pgaudit", (f"{self._pg_time(t_s)} [{r.randint(1000, 99999)}] "
                           f"{r.choice(self.roles)}@ehr LOG:  AUDIT: SESSION,"
                           f"{r.randint(1, 500)},1,READ,SELECT,TABLE,{table},\"{stmt}\","
                           f"<not logged>")

    def pg_phi(self, t_s: float) -> tuple[str, str]:
        r = self.rng
        trace, span = uuid.UUID(int=r.getrandbits(128)).hex, f"{r.getrandbits(64):016x}"
        stmt = (f"SELECT given, family, birth_date FROM public.patients WHERE mrn = "
                f"'MRN-{r.randint(10**5, 10**6)}' /*controller='chart',"
                f"traceparent='00-{trace}-{span}-01'*/")
        return "pgaudit", (f"{self._pg_time(t_s)} [{r.randint(1000, 99999)}] ehr_app@ehr LOG:  "
                           f"AUDIT: SESSION,{r.randint(1, 500)},1,READ,SELECT,TABLE,"
                           f"public.patients,\"{stmt}\",<not logged>")

    def _s3(self, t_s: float, bucket: str, key: str, role: str) -> str:
        r = self.rng
        return json.dumps({
            "eventVersion": "1.09", "eventSource": "s3.amazonaws.com", "eventName": "GetObject",
            "eventTime": dt.datetime.fromtimestamp(t_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "eventID": str(uuid.UUID(int=r.getrandbits(128))), "awsRegion": "us-east-1",
            "eventType": "AwsApiCall", "eventCategory": "Data", "readOnly": True,
            "userIdentity": {"type": "AssumedRole",
                             "arn": f"arn:aws:sts::111122223333:assumed-role/{role}/session",
                             "accountId": "111122223333"},
            "sourceIPAddress": r.choice(self.hosts), "userAgent": "[aws-sdk-go/1.44.0]",
            "requestParameters": {"bucketName": bucket, "key": key,
                                  "Host": f"{bucket}.s3.amazonaws.com"},
            "responseElements": None, "recipientAccountId": "111122223333",
            "resources": [{"type": "AWS::S3::Object", "ARN": f"arn:aws:s3:::{bucket}/{key}"}]})

    def ct_other(self, t_s: float) -> tuple[str, str]:
        return "cloudtrail", self._s3(t_s, "public-web", self.rng.choice(self.assets), "cdn-sync")

    def ct_phi(self, t_s: float) -> tuple[str, str]:
        key = f"2026/export-{self.rng.randint(1, 10**6)}.ndjson"
        return "cloudtrail", self._s3(t_s, "phi-exports", key, "etl")


def build_requests(records: int, rate: float, phi_share: float, seed: int
                   ) -> tuple[list[bytes], int, int]:
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.logs.v1 import logs_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2

    def kv(k: str, v: str) -> common_pb2.KeyValue:
        return common_pb2.KeyValue(key=k, value=common_pb2.AnyValue(string_value=v))

    rng = random.Random(seed)
    mix = Mix(rng, phi_share)
    start = time.time() - records / rate - 120
    requests, raw_bytes = [], 0
    resource = resource_pb2.Resource(attributes=[kv("service.name", "otelcol-gateway"),
                                                 kv("host.name", "collector-1")])
    for first in range(0, records, PER_REQUEST):
        recs = []
        for i in range(first, min(records, first + PER_REQUEST)):
            t_s = start + i / rate
            kind, body = mix.record(t_s)
            raw_bytes += len(body.encode())
            recs.append(logs_pb2.LogRecord(
                time_unix_nano=int(t_s * 1e9), observed_time_unix_nano=int(t_s * 1e9) + 10**9,
                body=common_pb2.AnyValue(string_value=body),
                attributes=[kv("phi.infra.kind", kind), kv("log.file.name", f"{kind}.log")]))
        req = logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
            resource=resource, scope_logs=[logs_pb2.ScopeLogs(log_records=recs)])])
        requests.append(req.SerializeToString())
    return requests, raw_bytes, sum(len(r) for r in requests)


# -- the service -------------------------------------------------------------------------------

def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PHIAUDIT_", "OTEL_"))}


def start(data_dir: Path, config: Path) -> tuple[subprocess.Popen[bytes], str]:
    data_dir.mkdir(parents=True)
    log = open(data_dir.parent / f"{data_dir.name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "phiaudit.receiver", "serve", "--data-dir", str(data_dir),
         "--listen", "127.0.0.1:0", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env=_clean_env())
    run_file = data_dir / "run" / "service.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode}")
        if run_file.exists():
            try:
                info = json.loads(run_file.read_text())
                if info.get("pid") == proc.pid:
                    return proc, str(info["address"])
            except ValueError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the service did not start")


def send(address: str, requests: list[bytes], clients: int) -> tuple[float, int]:
    import grpc

    todo = list(enumerate(requests))
    lock = threading.Lock()
    unavailable = [0]

    def client() -> None:
        with grpc.insecure_channel(address, options=[
                ("grpc.max_send_message_length", 64 << 20)]) as ch:
            call = ch.unary_unary(EXPORT)
            while True:
                with lock:
                    if not todo:
                        return
                    _, raw = todo.pop()
                while True:
                    try:
                        call(raw, timeout=60)
                        break
                    except grpc.RpcError as exc:
                        if exc.code() != grpc.StatusCode.UNAVAILABLE:
                            raise
                        with lock:
                            unavailable[0] += 1
                        time.sleep(0.2)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, unavailable[0]


_MEASURE = """
import json, sys
from pathlib import Path
from phiaudit.storage import admin_client
ch = admin_client(Path(sys.argv[1]))  # an administrator's engine: OPTIMIZE is not the service's
optimized = True
for t in ("infra_events", "infra_rollups"):
    try:
        ch.command(f"OPTIMIZE TABLE phiaudit.{t} FINAL")
    except Exception:
        optimized = False
rows = ch.query("SELECT table, sum(bytes_on_disk), sum(rows), "
                "sum(data_uncompressed_bytes) FROM system.parts WHERE active AND "
                "database = 'phiaudit' AND table IN ('infra_events', 'infra_rollups') "
                "GROUP BY table").result_rows
rec = ch.query("SELECT sum(records), sum(raw_bytes) FROM phiaudit.infra_rollups").result_rows
phi = ch.query("SELECT countIf(phi_touch), count() FROM phiaudit.infra_events").result_rows
print(json.dumps({"parts": {r[0]: {"bytes_on_disk": int(r[1]), "rows": int(r[2]),
                                   "uncompressed": int(r[3])} for r in rows},
                  "rolled_up_records": int(rec[0][0] or 0), "phi_rows": int(phi[0][0]),
                  "whole_rows": int(phi[0][1]), "optimized": optimized}))
ch.close()
"""


def run(workdir: Path, name: str, rollup: bool, requests: list[bytes], clients: int
        ) -> dict[str, Any]:
    config = workdir / f"{name}.yaml"
    config.write_text(CONFIG.format(rollup="true" if rollup else "false"))
    data = workdir / name
    proc, address = start(data, config)
    try:
        send(address, requests[:2], 1)  # warm-up (also stored: counted in both runs)
        seconds, unavailable = send(address, requests[2:], clients)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    if code != 0:
        raise RuntimeError(f"the service exited with {code}")
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(data)], capture_output=True,
                         text=True, env=_clean_env(), check=True, timeout=600)
    measured: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    measured.update(seconds=seconds, unavailable=unavailable,
                    measured_records=(len(requests) - 2) * PER_REQUEST)
    measured["bytes_on_disk"] = sum(p["bytes_on_disk"] for p in measured["parts"].values())
    return measured


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="records per second of event time (default 1000)")
    ap.add_argument("--phi-share", type=float, default=0.05)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=20261126)
    args = ap.parse_args(argv)
    requests, raw_bytes, wire_bytes = build_requests(args.records, args.rate, args.phi_share,
                                                     args.seed)
    records = min(args.records, len(requests) * PER_REQUEST)
    print(f"{records:,} records ({args.phi_share:.0%} PHI), {raw_bytes / 1e6:.1f} MB of raw "
          f"records, {len(requests)} requests, {records / args.rate / 60:.1f} min of event time")
    with tempfile.TemporaryDirectory(prefix="phiaudit-bench-infra-") as tmp:
        workdir = Path(tmp)
        rolled = run(workdir, "rollup", True, requests, args.clients)
        whole = run(workdir, "whole", False, requests, args.clients)
    ratio = whole["bytes_on_disk"] / max(1, rolled["bytes_on_disk"])

    def line(name: str, r: dict[str, Any]) -> None:
        parts = r["parts"]
        ev, ro = parts.get("infra_events", {}), parts.get("infra_rollups", {})
        print(f"  {name:<22} infra_events {ev.get('rows', 0):>8,} rows "
              f"{ev.get('bytes_on_disk', 0) / 1e6:7.2f} MB | infra_rollups "
              f"{ro.get('rows', 0):>6,} rows {ro.get('bytes_on_disk', 0) / 1e6:6.2f} MB | "
              f"total {r['bytes_on_disk'] / 1e6:7.2f} MB | "
              f"{r['measured_records'] / r['seconds']:8,.0f} records/s")

    print("on disk (system.parts bytes_on_disk, after OPTIMIZE FINAL"
          + ("" if rolled["optimized"] and whole["optimized"] else ": NOT ALLOWED, unmerged")
          + "):")
    line("rollup: true", rolled)
    line("rollup: false (whole)", whole)
    print(f"  storage saved: {ratio:.1f}x less with rollups "
          f"({1 - 1 / ratio:.0%}); PHI rows kept whole in both: {rolled['phi_rows']:,} / "
          f"{whole['phi_rows']:,}; rolled-up records counted: {rolled['rolled_up_records']:,}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "time": dt.datetime.now(dt.UTC).isoformat(), "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version()},
        "args": vars(args), "records": records, "raw_bytes": raw_bytes,
        "wire_bytes": wire_bytes, "rollup": rolled, "whole": whole, "ratio": ratio}, indent=2))
    print(f"written {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

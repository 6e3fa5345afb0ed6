"""Tamper evidence end to end: a real `phiaudit serve` writes events and signed checkpoints
(table and anchor directory); the service is stopped; an administrator engine in a child
process changes the store (tests/e2e/tamper_tool.py); `phiaudit verify` must find and locate
every change, and `phiaudit prove` must give a proof a third party can check."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tests.conftest import ROOT, cli_env, run_cli, start_service, tracer_provider

ROWS = 60
PATIENT = "pat-secret-4711"


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stopped service's data directory (with its .keys and .anchor siblings)."""
    base = tmp_path_factory.mktemp("golden")
    config = base / "config.yaml"
    config.write_text("checkpoint_events: 10\ncheckpoint_interval_ms: 200\n"
                      "checkpoint_heartbeat_ms: 3600000\nworkers: 0\n")
    svc = start_service(base / "data", "--config", str(config))
    try:
        provider = tracer_provider(svc.address)
        tracer = provider.get_tracer("ehr")
        for batch in range(ROWS // 10):
            for i in range(10):
                with tracer.start_as_current_span("GET /fhir/Patient", attributes={
                        "phi.audit.event": True, "phi.audit.action": "read",
                        "phi.patient.id": f"{PATIENT}-{batch}-{i}", "enduser.id": "dr.who",
                        "phi.resource.type": "Patient", "phi.resource.id": "p1",
                        "user.roles": ["physician"]}):
                    pass
            time.sleep(0.6)  # let the checkpointer sign this size
        provider.shutdown()
    finally:
        assert svc.stop() == 0, svc.log()
    return base / "data"


def _copy(golden: Path, dest: Path) -> Path:
    for suffix in ("", ".keys", ".anchor"):
        shutil.copytree(str(golden) + suffix, str(dest / "data") + suffix, symlinks=True)
    return dest / "data"


@pytest.fixture
def store_copy(golden: Path, tmp_path: Path) -> Iterator[Path]:
    yield _copy(golden, tmp_path)


def _tamper(data_dir: Path, scenario: str, arg: int = 0) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.tamper_tool", str(data_dir),
                           scenario, str(arg)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=cli_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _reader_env(data_dir: Path) -> dict[str, str]:
    """The environment of a reader: the store's initial security credential."""
    token = (data_dir / "credentials" / "admin.token").read_text().strip()
    return cli_env(PHIAUDIT_TOKEN=token)


def _verify(data_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    res = run_cli("verify", "--data-dir", str(data_dir), *flags, env=_reader_env(data_dir))
    assert PATIENT not in res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    return res


def _findings(res: subprocess.CompletedProcess[str]) -> list[dict[str, str]]:
    out = []
    for line in res.stdout.splitlines():
        if line.startswith(("OK", "FAILED")):
            continue
        kind, rest = line.split(": ", 1)
        fields = dict(kv.split("=", 1) for kv in rest.split(": ", 1)[0].split())
        out.append({"kind": kind, **fields, "detail": rest.split(": ", 1)[1]})
    return out


def _anchored(data_dir: Path) -> list[int]:
    from phiaudit.storage import DirectoryAnchor, default_anchor_dir

    return sorted(c.tree_size for c in DirectoryAnchor(default_anchor_dir(data_dir))
                  .checkpoints() if c.table == "audit_events")


def test_clean_store_verifies_ok_with_counts(store_copy: Path) -> None:
    sizes = _anchored(store_copy)
    assert len(sizes) >= 3 and sizes[-1] == ROWS  # several checkpoints; the last covers all
    res = _verify(store_copy)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(f"OK: {ROWS} rows of 1 writer(s)")
    assert "anchored checkpoint(s); hashes recomputed in SQL" in res.stdout
    # no terminal: no progress bar
    assert "[#" not in res.stderr
    py = _verify(store_copy, "--mode", "python")
    assert py.returncode == 0 and "in Python" in py.stdout
    # each verify is itself recorded in access_log (one more row of the command line's writer)
    win = _verify(store_copy, "--since", "2000-01-01", "--until", "2999-01-01T00:00:00+00:00")
    assert win.returncode == 0 and win.stdout.startswith(f"OK: {ROWS + 2} rows of 2 writer")
    empty = _verify(store_copy, "--until", "2000-01-01")
    assert empty.returncode == 0 and empty.stdout.startswith("OK: 0 rows")


@pytest.mark.parametrize("mode", ["sql", "python"])
def test_updated_field_is_located(store_copy: Path, mode: str) -> None:
    info = _tamper(store_copy, "update_field", 5)
    res = _verify(store_copy, "--mode", mode)
    assert res.returncode == 1
    found = _findings(res)
    assert [(f["kind"], f["seq"], f["event"]) for f in found] == [
        ("row_altered", "5", info["event_id"])]
    assert found[0]["writer"] == info["writer"]
    # a time window that holds the row finds it; one that does not, does not
    inside = _findings(_verify(store_copy, "--mode", mode, "--since", "2000-01-01"))
    assert [(f["kind"], f["seq"]) for f in inside] == [("row_altered", "5")]
    outside = _verify(store_copy, "--mode", mode, "--until", "2000-01-01")
    assert outside.returncode == 0 and outside.stdout.startswith("OK: 0 rows")


def test_deleted_middle_row_is_located(store_copy: Path) -> None:
    _tamper(store_copy, "delete_row", 30)
    found = _findings(_verify(store_copy))
    assert {"kind": "gap", "seq": "31"}.items() <= next(
        f for f in found if f["kind"] == "gap").items()
    assert "rows 30..30 are missing" in next(f for f in found if f["kind"] == "gap")["detail"]
    # the checkpoints past the hole no longer match
    assert any(f["kind"] in ("root_mismatch", "checkpoint_beyond_rows") for f in found)


def test_truncated_tail_is_located(store_copy: Path) -> None:
    _tamper(store_copy, "delete_rows_from", 51)
    res = _verify(store_copy)
    assert res.returncode == 1
    found = _findings(res)
    beyond = [f for f in found if f["kind"] == "checkpoint_beyond_rows"]
    assert beyond and all(f["seq"] == "51" for f in beyond)
    assert f"rows 51..{ROWS} missing" in beyond[-1]["detail"]
    # the rows left are a valid chain: only the checkpoints can tell
    assert {f["kind"] for f in found} == {"checkpoint_beyond_rows"}


def test_forged_row_is_located(store_copy: Path) -> None:
    info = _tamper(store_copy, "forge_row", 20)
    found = _findings(_verify(store_copy))
    dup = [f for f in found if f["kind"] == "duplicate_seq"]
    assert len(dup) == 1 and dup[0]["seq"] == "20"
    assert info["event_id"] in dup[0]["event"] + dup[0]["detail"]
    assert sum(info["event_id"] in str(f) for f in found) == 1


def test_reordered_rows_are_located(store_copy: Path) -> None:
    info = _tamper(store_copy, "reorder", 40)
    found = _findings(_verify(store_copy))
    altered = {(f["seq"], f["event"]) for f in found if f["kind"] == "row_altered"}
    # the row now at 40 is the old 41 and vice versa
    assert altered == {("40", info["event_ids"][1]), ("41", info["event_ids"][0])}


def test_consistent_rewrite_without_key_is_caught_by_signed_roots(store_copy: Path) -> None:
    _tamper(store_copy, "rewrite", 25)
    found = _findings(_verify(store_copy))
    kinds = {f["kind"] for f in found}
    assert kinds == {"root_mismatch"}, found  # every row hash and link is consistent
    # located: the first mismatching checkpoint bounds the changed rows
    first = min(found, key=lambda f: int(f["seq"]))
    lo, hi = first["detail"].rsplit("between seq ", 1)[1].split(" and ")
    assert int(lo) <= 25 <= int(hi)
    # checkpoints before the change still match
    sizes = _anchored(store_copy)
    assert all(int(f["seq"]) >= 25 for f in found)
    assert any(s < 25 for s in sizes)


def test_rewrite_with_stolen_key_is_caught_by_the_anchor(store_copy: Path) -> None:
    info = _tamper(store_copy, "rewrite_stolen_key", 25)
    assert info["checkpoints"] >= 3
    found = _findings(_verify(store_copy))
    kinds = {f["kind"] for f in found}
    assert "bad_signature" not in kinds  # the re-signed checkpoints are valid...
    assert "checkpoint_conflict" in kinds  # ...but differ from the anchored ones
    assert all(int(f["seq"]) >= 25 for f in found if f["kind"] == "checkpoint_conflict")
    # without the anchor the table alone looks consistent: the anchor is what caught it
    (store_copy.parent / "empty").mkdir()
    alone = _verify(store_copy, "--anchor", str(store_copy.parent / "empty"))
    assert {f["kind"] for f in _findings(alone)} == {"checkpoint_not_anchored"}


def test_deleted_checkpoint_is_located(store_copy: Path) -> None:
    info = _tamper(store_copy, "delete_checkpoint", 1)
    found = _findings(_verify(store_copy))
    assert [(f["kind"], f["seq"]) for f in found] == [
        ("checkpoint_missing", str(info["tree_size"]))]


def _independent_check(proof: dict[str, Any]) -> bool:
    """The documented algorithm, written out with hashlib and cryptography only."""
    sha = hashlib.sha256
    note = proof["checkpoint"]
    body, sig_line = note.split("\n\n", 1)
    key_id, sig = sig_line.strip().split(" ")[1:]
    public = base64.b64decode(proof["public_key"])
    if sha(public).hexdigest()[:16] != key_id or key_id != proof["key_id"]:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(base64.b64decode(sig),
                                                          (body + "\n").encode())
    except Exception:
        return False
    fields = dict(line.split(" ", 1) for line in body.split("\n")[1:])
    if (fields["writer"] != proof["writer_id"] or int(fields["size"]) != proof["tree_size"]
            or fields["root"] != proof["root_hash"]
            or not fields["origin"].endswith("/" + proof["table"])):
        return False

    def ns(b: bytes) -> bytes:
        return str(len(b)).encode() + b":" + b

    entry = sha(bytes.fromhex(proof["prev_hash"]) + ns(proof["writer_id"].encode())
                + ns(str(proof["seq"]).encode()) + bytes.fromhex(proof["row_leaf"])).digest()
    if entry.hex() != proof["entry"]:
        return False
    fn, sn = proof["leaf_index"], proof["tree_size"] - 1
    r = sha(b"\x00" + entry).digest()
    for p in (bytes.fromhex(x) for x in proof["inclusion_path"]):
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = sha(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = sha(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    return sn == 0 and r.hex() == proof["root_hash"]


def test_prove_gives_a_proof_a_third_party_can_check(store_copy: Path) -> None:
    res = _verify(store_copy)
    assert res.returncode == 0
    # an event id, read with an engine of its own (the store is not running)
    ids = subprocess.run(
        [sys.executable, "-c",
         "import sys;from phiaudit.storage import admin_client;c=admin_client(sys.argv[1]);"
         "print(c.query(\"SELECT toString(event_id) FROM phiaudit.audit_events WHERE seq=37\")"
         ".result_rows[0][0])", str(store_copy)],
        capture_output=True, text=True, timeout=120, env=cli_env(), check=True).stdout.strip()
    out = run_cli("prove", "--data-dir", str(store_copy), ids, env=_reader_env(store_copy))
    assert out.returncode == 0, out.stderr
    assert PATIENT not in out.stdout
    proof = json.loads(out.stdout)
    assert proof["format"] == "phiaudit-inclusion-proof/1"
    assert proof["seq"] == 37 and proof["tree_size"] == ROWS and proof["event_id"] == ids
    assert _independent_check(proof)
    for key in ("entry", "root_hash", "row_leaf"):
        bad = dict(proof)
        bad[key] = ("0" if proof[key][0] != "0" else "1") + proof[key][1:]
        assert not _independent_check(bad)
    bad = dict(proof, inclusion_path=list(reversed(proof["inclusion_path"])))
    assert not _independent_check(bad)
    unknown = run_cli("prove", "--data-dir", str(store_copy),
                      "00000000-0000-0000-0000-000000000001", env=_reader_env(store_copy))
    assert unknown.returncode == 1 and "no event" in unknown.stderr


def test_progress_bar_only_on_a_terminal(store_copy: Path) -> None:
    import os
    import pty

    main, sub = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "phiaudit.receiver", "verify",
                               "--data-dir", str(store_copy)], stdout=subprocess.PIPE,
                              stderr=sub, text=True, timeout=120,
                              env=_reader_env(store_copy), check=False)
        os.close(sub)
        seen = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(main)
    assert proc.returncode == 0 and proc.stdout.startswith("OK:")
    assert b"[###" in seen and b"100%" in seen  # the bar went to the terminal
    assert "[#" not in proc.stdout


def test_verify_refuses_a_data_dir_the_service_holds(tmp_path: Path) -> None:
    svc = start_service(tmp_path / "data")
    try:
        res = _verify(svc.data_dir)
        assert res.returncode == 1
        assert "the service holds this data directory: stop it first" in res.stderr
    finally:
        assert svc.stop() == 0
    after = _verify(svc.data_dir)
    assert after.returncode == 0 and after.stdout.startswith("OK: 0 rows")


def test_verify_and_prove_need_a_reader_credential_and_are_recorded(store_copy: Path) -> None:
    for command in (["verify"], ["prove", "00000000-0000-0000-0000-000000000001"]):
        for env in (cli_env(), cli_env(PHIAUDIT_TOKEN="phia_not-a-token")):
            res = run_cli(command[0], "--data-dir", str(store_copy), *command[1:], env=env)
            assert res.returncode == 2, res.stderr
            assert res.stdout == "" and "Traceback" not in res.stderr
    ok = _verify(store_copy)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    log = run_cli("sql", "--data-dir", str(store_copy), "--format", "csv", "--decrypt",
                  "SELECT event_id, outcome, statement FROM access_log "
                  "WHERE interface = 'direct' ORDER BY seq", env=_reader_env(store_copy))
    assert log.returncode == 0, log.stderr
    lines = [line.split(",", 1)[1] for line in log.stdout.splitlines()[1:]]
    assert lines.count("denied,phiaudit verify") == 2
    assert lines.count("denied,phiaudit prove") == 2
    assert "ok,phiaudit verify" in lines

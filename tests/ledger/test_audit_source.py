"""Where audits get their data: dump files written and read back, a coordinator's auditor
endpoints over real HTTP (a small aiohttp app stands in for the coordinator, whose endpoints
are not written yet), and ``meshmint-ledger audit`` end to end with its exit statuses."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import audit_source
from ledger.audit import audit
from ledger.audit_report import AuditReport
from ledger.audit_source import (
    AuditSourceError,
    DumpAuditSource,
    HttpAuditSource,
    OperatorKey,
    frame,
    split_frames,
    write_dump,
)
from ledger.checkpoint import CheckpointSigner, parse_verifier_key
from ledger.cli import main
from ledger.entry import decode_entry
from tests.ledger.test_audit import ORIGIN, SIGNER, Sequencer, busy_log
from tests.tls_certs import issue, make_ca, write_ca

KEY = OperatorKey(ORIGIN, SIGNER.verifier_key)


def dump(log: Sequencer, path: Path, *, entries: list[bytes] | None = None) -> Path:
    entries = log.entries if entries is None else entries
    with path.open("wb") as out:
        written = write_dump(
            out,
            key=KEY,
            balances=log.balances,
            balances_size=len(log.entries),
            checkpoints=log.checkpoints,
            entries=entries,
            entry_count=len(entries),
        )
    assert written == len(entries)
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["audit", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_split_frames_keeps_the_incomplete_tail() -> None:
    data = frame(b"abc") + frame(b"") + frame(b"defg")[:5]
    assert split_frames(data) == ([b"abc", b""], 11)
    with pytest.raises(AuditSourceError, match="claims"):
        split_frames(b"\xff\xff\xff\xff")


def test_dump_round_trip_across_read_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = busy_log()
    path = dump(log, tmp_path / "ledger.dump")
    monkeypatch.setattr(audit_source, "READ_CHUNK", 97)  # frames straddle every read
    with DumpAuditSource(path) as source:
        assert source.key() == KEY
        given = source.audit_input()
        assert given.claimed_size == given.balances_size == len(log.entries)
        assert list(given.checkpoints) == log.checkpoints
        assert dict(given.balances) == log.balances
        assert list(given.entries) == log.entries


def test_cli_audits_a_clean_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = busy_log()
    path = str(dump(log, tmp_path / "ledger.dump"))

    status, out, err = cli(capsys, "--dump", path)
    assert (status, err) == (0, "")
    assert "OK: no findings" in out and "not pinned" in out

    status, out, _ = cli(capsys, "--dump", path, "--verifier-key", SIGNER.verifier_key, "--json")
    document = json.loads(out)
    assert status == 0 and document["ok"] is True and document["verifier_key_pinned"] is True
    assert document["entries"] == len(log.entries) and document["findings"] == []
    assert document["latest_checkpoint"]["size"] == len(log.entries)
    assert document["source"] == path and document["origin"] == ORIGIN


def test_cli_exit_status_1_on_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = busy_log()
    entries = list(log.entries)
    entries[7] = entries[7][:-1] + bytes([entries[7][-1] ^ 1])
    path = str(dump(log, tmp_path / "tampered.dump", entries=entries))

    status, out, _ = cli(capsys, "--dump", path, "--json")
    assert status == 1
    assert "checkpoint.root_mismatch" in json.loads(out)["finding_counts"]
    status, out, _ = cli(capsys, "--dump", path)
    assert status == 1 and "FAILED" in out and "checkpoint.root_mismatch" in out


def test_cli_trusted_checkpoint_catches_re_signed_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    honest = busy_log(every=8)
    trusted = tmp_path / "trusted.note"
    trusted.write_bytes(honest.checkpoints[4])  # size 40
    forged = Sequencer(every=8)
    for data in honest.entries[:20]:
        entry = decode_entry(data)
        forged.write(entry.kind, entry.debit, entry.credit, entry.amount, entry.hold_id)
    forged.traffic(15, seed=3)
    forged.checkpoint()
    path = str(dump(forged, tmp_path / "forged.dump"))

    assert cli(capsys, "--dump", path)[0] == 0
    status, out, _ = cli(capsys, "--dump", path, "--trusted-checkpoint", str(trusted), "--json")
    assert status == 1 and set(json.loads(out)["finding_counts"]) == {
        "trusted.inconsistent",
        "trusted.withdrawn",
    }


def test_cli_pinned_key_that_the_operator_does_not_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(dump(busy_log(), tmp_path / "ledger.dump"))
    other = CheckpointSigner(ORIGIN, Ed25519PrivateKey.generate()).verifier_key
    status, out, _ = cli(capsys, "--dump", path, "--verifier-key", other, "--json")
    document = json.loads(out)
    assert status == 1 and set(document["finding_counts"]) == {"checkpoint.signature"}
    assert any("different key" in note for note in document["notes"])


def test_cli_exit_status_2_when_it_cannot_audit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = dump(busy_log(), tmp_path / "ledger.dump")
    cut = tmp_path / "cut.dump"
    cut.write_bytes(good.read_bytes()[:-3])
    junk = tmp_path / "junk.dump"
    junk.write_bytes(b"PK\x03\x04 not a dump")
    bad_note = tmp_path / "bad.note"
    bad_note.write_bytes(b"not a checkpoint\n")
    cases = {
        "ends inside an entry": ["--dump", str(cut)],
        "not a meshmint ledger dump": ["--dump", str(junk)],
        "cannot open": ["--dump", str(tmp_path / "missing.dump")],
        "verifier key": ["--dump", str(good), "--verifier-key", "nonsense"],
        "trusted checkpoint": ["--dump", str(good), "--trusted-checkpoint", str(bad_note)],
    }
    for expected, argv in cases.items():
        status, out, err = cli(capsys, *argv)
        assert status == 2, expected
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err
        assert out == ""


# --- the coordinator's auditor endpoints over HTTP ---------------------------------------------


@dataclass
class Coordinator:
    """The auditor endpoints of a coordinator, serving a Sequencer's log."""

    log: Sequencer
    entries: list[bytes] = field(default_factory=list)  # what /ledger/entries serves
    max_page: int = 10**9  # the server's own page cap: answers may be shorter than asked
    broken: dict[str, Callable[[], web.Response]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ledger/{what}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        what = request.match_info["what"]
        self.requests.append(request.path_qs)
        if what in self.broken:
            return self.broken[what]()
        start = int(request.query.get("start", 0))
        limit = int(request.query.get("limit", 0))
        if what == "key":
            return web.json_response({"origin": KEY.origin, "verifier_key": KEY.verifier_key})
        if what == "balances":
            return web.json_response({"balances": self.log.balances, "size": len(self.log.entries)})
        if what == "checkpoints":
            # Like the coordinator: checkpoints of size >= start, smallest first.
            sized = [n for n in self.log.checkpoints if int(n.split(b"\n")[1]) >= start]
            notes = sized[:limit]
            return web.json_response({"checkpoints": [n.decode() for n in notes]})
        if what == "checkpoint":
            return web.Response(body=self.log.checkpoints[-1], content_type="text/plain")
        if what == "entries":
            page = self.entries[start : start + min(limit, self.max_page)]
            body = b"".join(frame(e) for e in page)
            return web.Response(body=body, content_type="application/octet-stream")
        raise web.HTTPNotFound()


@pytest.fixture
async def coordinator() -> AsyncIterator[tuple[Coordinator, str]]:
    log = busy_log(60)
    fake = Coordinator(log, entries=list(log.entries))
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def audit_http(url: str, *, page_size: int = 10_000) -> AuditReport:
    with HttpAuditSource(url, page_size=page_size) as source:
        key = source.key()
        return audit(
            source.audit_input(),
            verifier=parse_verifier_key(key.verifier_key),
            origin=key.origin,
        )


async def test_http_audit_pages_through_everything(coordinator: tuple[Coordinator, str]) -> None:
    fake, url = coordinator
    report = await asyncio.to_thread(audit_http, url, page_size=16)
    assert report.ok and report.entries == len(fake.entries)
    pages = [r for r in fake.requests if r.startswith("/ledger/entries")]
    assert len(pages) == -(-len(fake.entries) // 16)
    assert pages[1] == "/ledger/entries?start=16&limit=16"

    fake.requests.clear()
    fake.max_page = 5  # the server answers less than asked: the client follows
    report = await asyncio.to_thread(audit_http, url, page_size=16)
    assert report.ok and report.entries == len(fake.entries)


async def test_http_log_shorter_than_its_checkpoint_is_a_finding(
    coordinator: tuple[Coordinator, str],
) -> None:
    fake, url = coordinator
    fake.entries = fake.entries[:-10]
    report = await asyncio.to_thread(audit_http, url, page_size=16)
    assert {"log.truncated", "balance.beyond_log"} <= set(report.finding_counts)


async def test_http_failures_are_source_errors(coordinator: tuple[Coordinator, str]) -> None:
    fake, url = coordinator
    cases: dict[str, tuple[str, Callable[[], web.Response]]] = {
        "HTTP 500": ("balances", lambda: web.Response(status=500, text="boom")),
        "not JSON": ("key", lambda: web.Response(text="<html>")),
        "'size' is missing": ("balances", lambda: web.json_response({"balances": {}})),
        "not an integer": ("balances", lambda: web.json_response({"balances": {"fee": "1"}})),
        "cut short": ("entries", lambda: web.Response(body=frame(b"entry")[:-1])),
    }
    for expected, (what, response) in cases.items():
        fake.broken = {what: response}
        with pytest.raises(AuditSourceError, match=expected):
            await asyncio.to_thread(audit_http, url)


async def test_cli_over_http(coordinator: tuple[Coordinator, str]) -> None:
    fake, url = coordinator
    out = io.StringIO()

    def run(*argv: str) -> int:
        with contextlib.redirect_stdout(out):
            return main(["audit", *argv])

    assert await asyncio.to_thread(run, "--coordinator", url, "--json") == 0
    assert json.loads(out.getvalue())["entries"] == len(fake.entries)


def test_cli_unreachable_coordinator(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status, out, err = cli(capsys, "--coordinator", f"127.0.0.1:{port}")
    assert status == 2 and out == "" and err.count("\n") == 1
    assert f"cannot audit http://127.0.0.1:{port}" in err


async def test_cli_over_https_trusts_the_ca_it_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = make_ca()
    cert, key = issue(ca, "server", hosts=["127.0.0.1"]).write(tmp_path, "server")
    ca_file = write_ca(ca, tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    log = busy_log(20)
    runner = web.AppRunner(Coordinator(log, entries=list(log.entries)).app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        trusted = await asyncio.to_thread(cli, capsys, "--coordinator", url, "--ca", str(ca_file))
        assert trusted[0] == 0, trusted
        status, _, err = await asyncio.to_thread(cli, capsys, "--coordinator", url)
        assert status == 2 and "CERTIFICATE_VERIFY_FAILED" in err and "Traceback" not in err
        unreadable = tmp_path / "missing.pem"
        status, _, err = cli(capsys, "--coordinator", url, "--ca", str(unreadable))
        assert status == 2 and f"--ca {unreadable}: not a readable PEM certificate" in err
    finally:
        await runner.cleanup()

"""The embedded server: start and stop, sharing one data dir, long paths, database.connect."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from ledger.database import connect
from ledger.embedded import EmbeddedPostgres


async def query(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def running(pgdata: Path) -> bool:
    # pg_ctl stop -w returns only once the postmaster has exited and removed its pid file.
    return (pgdata / "postmaster.pid").exists()


def child(pgdata: Path, body: str) -> subprocess.Popen[str]:
    """A second process holding ``pg`` (an EmbeddedPostgres on ``pgdata``) while ``body`` runs."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from pathlib import Path
        import asyncpg
        from ledger.embedded import EmbeddedPostgres

        async def main():
            async with EmbeddedPostgres(Path(sys.argv[1])) as pg:
                conn = await asyncpg.connect(pg.url)
        {}
                await conn.close()

        asyncio.run(main())
        """
    ).format(textwrap.indent(textwrap.dedent(body), " " * 8))
    return subprocess.Popen(
        [sys.executable, "-c", script, str(pgdata)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_start_stop_restart(embedded_data_dir: Path) -> None:
    pgdata = embedded_data_dir / "deeper" / "postgres"
    async with EmbeddedPostgres(pgdata) as pg:
        assert running(pgdata)
        assert str(await query(pg.url, "SHOW server_version")).startswith("16")
        async with EmbeddedPostgres(pgdata) as inner:  # a second handle in this process
            assert inner.url == pg.url
        await query(pg.url, "CREATE TABLE kept AS SELECT 42 AS answer")
        url = pg.url
    assert not running(pgdata)
    with pytest.raises(OSError):
        await query(url, "SELECT 1")
    with pytest.raises(RuntimeError):
        _ = pg.url

    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await dead.wait()
    async with EmbeddedPostgres(pgdata) as pg:
        assert await query(pg.url, "SELECT answer FROM kept") == 42
        # A holder killed without letting go must not keep the server running forever.
        handles = pgdata / ".handle_pids.json"
        handles.write_text(json.dumps([*json.loads(handles.read_text()), dead.pid]))
    assert not running(pgdata)


async def test_processes_sharing_a_data_dir(embedded_data_dir: Path) -> None:
    pgdata = embedded_data_dir / "pg"
    # Another process joining and leaving does not stop our server.
    async with EmbeddedPostgres(pgdata) as pg:
        visitor = child(pgdata, "await conn.execute('CREATE TABLE visited (x int)')")
        assert visitor.wait(timeout=60) == 0
        assert await query(pg.url, "SELECT count(*) FROM visited") == 0
    assert not running(pgdata)

    # We leaving does not stop the server another process started; it stops it when it leaves.
    holder = child(
        pgdata,
        """
        print("started", flush=True)
        sys.stdin.readline()
        print(await conn.fetchval("SELECT 'still up'"), flush=True)
        """,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "started"
        async with EmbeddedPostgres(pgdata) as pg:
            assert await query(pg.url, "SELECT count(*) FROM visited") == 0
        assert running(pgdata)
        # Joining again registers us again: the holder leaving now must not stop it under us.
        async with EmbeddedPostgres(pgdata) as pg:
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "still up"
            assert holder.wait(timeout=60) == 0
            assert await query(pg.url, "SELECT 1") == 1
    finally:
        holder.kill()
    assert not running(pgdata)


async def test_connect_starts_a_server_in_a_data_dir_too_long_for_a_socket(
    embedded_data_dir: Path,
) -> None:
    data_dir = embedded_data_dir / ("d" * 60) / ("e" * 60)
    pgdata = data_dir / "postgres"
    assert len(str(pgdata / ".s.PGSQL.5432")) > 108
    async with connect(database_url=None, data_dir=data_dir, max_size=2) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        assert running(pgdata)
    assert not running(pgdata)


async def test_connect_uses_the_given_url(database_url: str, tmp_path: Path) -> None:
    async with connect(database_url=database_url, data_dir=tmp_path) as pool:
        name = await pool.fetchval("SELECT current_database()")
    assert name == urlsplit(database_url).path.removeprefix("/")
    assert os.listdir(tmp_path) == []  # no embedded server was started

"""Cell connections are kept for the next connect of the same process only when that is safe."""

from __future__ import annotations

import time

import psycopg

from orgmover import cells


def test_a_clean_connection_is_reused_and_nothing_else_is(devenv):
    cell = devenv.resolve_cell("legacy")
    with cell.connect() as a:
        first = a.info.backend_pid
    with cell.connect() as b:  # left cleanly: the same session
        assert b.info.backend_pid == first
        assert b.execute("SHOW TimeZone").fetchone()[0] == "UTC"  # the session settings hold
        b.close()  # closed by hand: really closed, never handed out again
    with cell.connect() as c:
        assert c.info.backend_pid != first
        second = c.info.backend_pid
    try:
        with cell.connect() as d:
            assert d.info.backend_pid == second
            d.execute("SELECT 1/0")
    except psycopg.errors.DivisionByZero:
        pass
    with cell.connect() as e:  # left with an error: its state is not known, so it was closed
        assert e.info.backend_pid != second
        third = e.info.backend_pid
    x = cell.connect()
    assert x.info.backend_pid == third
    with x.transaction():
        x.execute("SELECT 1")
    assert cells.release(x)  # given back outside a with block
    y = cell.connect()
    assert y.info.backend_pid == third
    with cell.connect() as killer:
        killer.execute("SELECT pg_terminate_backend(%s)", (third,))
    time.sleep(0.2)
    assert not cells.release(y)  # its server is gone: closed, not kept
    with cell.connect() as z:
        assert z.info.backend_pid != third and z.execute("SELECT 1").fetchone()[0] == 1


def test_keeping_can_be_turned_off(devenv, monkeypatch):
    monkeypatch.setenv("ORGMOVER_PG_IDLE_SECONDS", "0")
    cell = devenv.resolve_cell("legacy")
    with cell.connect() as a:
        first = a.info.backend_pid
    with cell.connect() as b:
        assert b.info.backend_pid != first

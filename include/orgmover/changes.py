"""Change capture on the source cell: a logical replication slot opened before the pre-copy.

Every row written on the source after the slot is created is in the slot's change stream, so in the
write window the mover re-copies exactly the rows that changed (by primary key) instead of scanning
the organization's rows (Vitess MoveTables and Ghostferry do the same with the binlog; pgcopydb with
a slot). The slot uses the ``test_decoding`` output plugin that ships with PostgreSQL (also on RDS
and Cloud SQL), read with ``pg_logical_slot_peek_changes``: reading does not consume. The caller
records what a read found and then confirms the slot up to it (:func:`advance`), so a task killed in
between reads the same changes again, and the next read starts where this one stopped. The slot is
dropped when the migration completes, is released or rolled back, since a slot keeps the cell's
WAL. Without the slot (dropped, invalidated, or a cell without ``wal_level=logical``) the mover falls
back to scanning rows written since the pre-copy's transaction horizon (``pgcopy.sync_changed_rows``):
slower, equally correct.

Only keys are kept, per table, in memory: the window re-reads the current rows from the source. A
table whose changes cannot be keyed (TRUNCATE, or deletes without key data because the table has
no primary key and no replica identity) is marked for the fallback scan.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Iterable

import psycopg

from orgmover.errors import StateError, TransientError

PLUGIN = "test_decoding"
_HEAD = re.compile(r"^table (?P<table>.+?): (?P<action>INSERT|UPDATE|DELETE|TRUNCATE):(?P<rest>.*)$", re.S)
# the common case, without parsing the tuple: a plain table name and a tuple that starts with an integer
# column (the key, when it is the table's single key column); anything else goes through parse_change
_FAST = re.compile(r"table (?P<table>[A-Za-z0-9_.$]+): (?P<action>INSERT|UPDATE|DELETE): (?:new-tuple: )?"
                   r"(?P<col>[a-z_][a-z0-9_$]*)\[[^\]]+\]:(?P<value>-?[0-9]+)(?: |$)")


class CaptureUnavailable(Exception):
    """The slot cannot be created or read (e.g. wal_level is not logical, no free slot)."""


class WritersStillRunning(TransientError, StateError):
    """Transactions that were writing on the cell when the org's writes were blocked are still running:
    what they will commit cannot be synced yet (and must not be lost by switching without it)."""


def slot_name(migration_id: int) -> str:
    return f"orgmover_migration_{int(migration_id)}"


def create_slot(conn: psycopg.Connection, name: str) -> str:
    """Create the slot (or keep it when it exists); returns its consistent point (LSN). Waits for
    transactions running on the source to finish, so that every row they wrote is either visible
    to the pre-copy or in the slot. ``conn`` must be in autocommit mode."""
    row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
    if row is not None:
        return row[0]
    try:
        return conn.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, %s)", (name, PLUGIN)).fetchone()[0]
    except psycopg.Error as e:
        raise CaptureUnavailable(str(e).strip()) from e


def drop_slot(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
    if row is None:
        return False
    if row[0] is not None:
        conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
    conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    return True


_NO_SNAPSHOT: set[tuple] = set()  # cells where the role may not log a snapshot of running transactions
# PostgreSQL 17+: a logical message written and flushed at once, outside any transaction
_EMIT_FLUSHED = "pg_logical_emit_message(false, 'orgmover', 'window', true)::text"


def _statement(conn: psycopg.Connection):
    """Where one statement may fail (a missing privilege) and the connection go on: in autocommit mode
    outside a transaction, the statement alone (no BEGIN and COMMIT round trips: in the window every
    round trip is writes blocked); otherwise a savepoint."""
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return contextlib.nullcontext()
    return conn.transaction()


def _where(conn: psycopg.Connection) -> tuple:
    return conn.info.host, conn.info.port, conn.info.dbname


def _log_running(conn: psycopg.Connection) -> None:
    """Log a snapshot of the running transactions (PostgreSQL 16+, superuser or a grant): a slot's
    restart point can only move to such a record, so without one it stays up to 15 s (the checkpointer's
    interval) or a long transaction behind what was confirmed, and every read decodes that WAL again,
    whatever else the cell wrote meanwhile. Optional: skipped where not permitted."""
    where = _where(conn)
    if conn.info.server_version < 160000 or where in _NO_SNAPSHOT:
        return
    try:
        with _statement(conn):
            conn.execute("SELECT pg_log_standby_snapshot()")
    except psycopg.errors.InsufficientPrivilege:
        _NO_SNAPSHOT.add(where)


def flush_point(conn: psycopg.Connection) -> str:
    """Flush the source's WAL up to now and return that LSN. Decoding only sees flushed WAL, and a
    transaction committed with ``synchronous_commit = off`` is visible before its WAL is flushed: without
    this, the last writes before the window could be missed."""
    _log_running(conn)
    if conn.info.server_version >= 170000:
        return conn.execute(f"SELECT {_EMIT_FLUSHED}").fetchone()[0]
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = on")
        lsn = conn.execute("SELECT pg_logical_emit_message(true, 'orgmover', 'window')::text").fetchone()[0]
    return lsn


# Writers: this statement takes a transaction id X (ids are handed out in order, so every transaction
# writing now holds a smaller one) and gives it back unless, by its snapshot, none below X is running
# (xmax = X: every smaller id had ended, or is in the in-progress list, which is empty).
_WRITING = ("(SELECT CASE WHEN pg_snapshot_xmax(s) = x AND NOT EXISTS (SELECT FROM pg_snapshot_xip(s)) THEN NULL "
            "ELSE x::text END FROM pg_current_snapshot() s, pg_current_xact_id() x)")


# every partition of a schema -> its root table (a json object; NULL when there is none)
_PARTITIONS = ("(SELECT json_object_agg(c.relname, r.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
               "JOIN pg_class r ON r.oid = pg_partition_root(c.oid) WHERE n.nspname = %s AND c.relispartition)")


def _slot_and_flush_point(conn: psycopg.Connection, name: str, schema: str, writers: bool = False) -> tuple | None:
    """(wal_status, confirmed point, flush point or None, writing transactions or None, the partitions
    of ``schema`` and their roots) of the slot; None when it does not exist. On PostgreSQL 17+ where
    the role may log running transactions, in one round trip with the snapshot and the flush point of
    :func:`flush_point` (in the window every round trip is writes blocked); otherwise the flush point
    is left to :func:`flush_point`.
    ``writers``: also the ids of the transactions writing on the cell at this moment."""
    where = _where(conn)
    also = f", {_WRITING}" if writers else ", NULL"
    if conn.info.server_version >= 170000 and where not in _NO_SNAPSHOT:
        try:
            with _statement(conn):
                row = conn.execute(f"SELECT wal_status, confirmed_flush_lsn::text, pg_log_standby_snapshot(), {_EMIT_FLUSHED}"
                                   f"{also}, {_PARTITIONS} FROM pg_replication_slots WHERE slot_name = %s",
                                   (schema, name)).fetchone()
            return None if row is None else (row[0], row[1], row[3], row[4], row[5])
        except psycopg.errors.InsufficientPrivilege:
            _NO_SNAPSHOT.add(where)
    return conn.execute(f"SELECT wal_status, confirmed_flush_lsn::text, NULL{also}, {_PARTITIONS} FROM pg_replication_slots "
                        "WHERE slot_name = %s", (schema, name)).fetchone()


# none below the id is still running, but for autovacuum workers (an autoanalyze holds an id while it
# writes statistics; it never writes the org's rows): a running id below it is in a fresh snapshot's list
_NONE_BELOW = ("SELECT NOT EXISTS (SELECT FROM pg_snapshot_xip(pg_current_snapshot()) x WHERE x < %s::text::xid8 "
               "AND mod(x::text::bigint, 4294967296)::text NOT IN (SELECT backend_xid::text FROM pg_stat_activity "
               "WHERE backend_type = 'autovacuum worker' AND backend_xid IS NOT NULL))")


def wait_for_writers(conn: psycopg.Connection, timeout: float, before: str | None = "now") -> float:
    """Wait until the transactions writing on the cell now (or, with ``before``, those holding a
    transaction id below it: from :data:`_WRITING`, read after the org's writes were blocked) have
    ended; returns the seconds waited. A request that began writing before maintenance went on may
    commit after it: read before it ends, its rows would be missed by the window's sync and lost with
    the switch. Transactions that start writing after maintenance is on are the application's to
    refuse (it checks maintenance before it commits).

    Transaction ids are the cluster's, so this also waits for other databases' and other orgs' writers
    (a cell's writers are short; a long one is named in the error), though not for autovacuum workers.
    ``conn`` in autocommit mode.
    Raises :class:`WritersStillRunning` after ``timeout`` seconds, naming each transaction still running."""
    t0 = time.monotonic()
    if before == "now":
        before = conn.execute(f"SELECT {_WRITING}").fetchone()[0]
    delay = 0.002
    while before is not None:
        if conn.execute(_NONE_BELOW, (before,)).fetchone()[0]:
            break
        if time.monotonic() - t0 >= timeout:
            raise WritersStillRunning(_writers(conn, before, timeout))
        time.sleep(delay)
        delay = min(delay * 2, 0.01)  # writes are blocked meanwhile: seen soon after they end
    return time.monotonic() - t0


def _writers(conn: psycopg.Connection, before: str, timeout: float) -> str:
    """Who holds a transaction id below ``before``: each backend's pid, database, start and statement
    (what the role may see), and prepared transactions by their name."""
    older = "age({0}) > age(%s::text::xid)"  # pg_stat_activity shows 32-bit ids: compared by age
    short = str(int(before) % (1 << 32))
    rows = conn.execute(
        "SELECT backend_xid::text, pid, datname, xact_start, state, left(regexp_replace(query, '\\s+', ' ', 'g'), 120) "
        f"FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND backend_type <> 'autovacuum worker' "
        f"AND {older.format('backend_xid')} UNION ALL "
        "SELECT transaction::text, NULL, database, prepared, 'prepared as ' || quote_literal(gid), NULL "
        f"FROM pg_prepared_xacts WHERE {older.format('transaction')} ORDER BY 1", (short, short)).fetchall()
    parts = [f"transaction {x} ({f'pid {pid}, ' if pid else ''}{state} in database {db} since {since:%H:%M:%S}"
             f"{f': {query}' if query else ''})" for x, pid, db, since, state, query in rows] \
        or ["none of them visible to this role"]
    return (f"writes are blocked, but {len(rows) or 'some'} transaction(s) that were writing on the cell when maintenance went on "
            f"are still running after {timeout:g}s: " + "; ".join(parts)
            + ". They may write the org's rows, which the window cannot sync before they commit. Let them finish or "
              "end them (pg_terminate_backend, or ROLLBACK PREPARED), then retry the window; the org stays in maintenance on the source "
              "until then (release lifts it), and nothing was synced")


def advance(conn: psycopg.Connection, name: str, lsn: str) -> None:
    """Confirm the slot up to ``lsn`` (a point :func:`read_changes` read up to, once what it read is
    recorded elsewhere): the cell may recycle the WAL before it, and the next read starts there, so
    reading costs what was written since, not since the slot was created. Never moves backwards."""
    try:
        conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (name, lsn))
    except psycopg.Error as e:
        raise CaptureUnavailable(str(e).strip()) from e


def retained_bytes(conn: psycopg.Connection, name: str) -> int | None:
    """WAL the slot keeps on the source (what an abandoned migration would cost the cell)."""
    row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots "
                       "WHERE slot_name = %s", (name,)).fetchone()
    return None if row is None else int(row[0] or 0)


# ---------------------------------------------------------------------------- test_decoding lines
def _quoted(s: str, i: int, q: str) -> tuple[str, int]:
    """The token quoted with ``q`` starting at ``s[i]`` (a doubled ``q`` inside stands for one), and
    the index after its closing quote."""
    out, i = [], i + 1
    while True:
        j = s.index(q, i)
        out.append(s[i:j])
        if s.startswith(q, j + 1):
            out.append(q)
            i = j + 2
        else:
            return "".join(out), j + 1


def _ident(s: str, i: int) -> tuple[str, int]:
    if s.startswith('"', i):
        return _quoted(s, i, '"')
    j = s.index("[", i)
    return s[i:j], j


def parse_fields(s: str, want: frozenset[str] | set[str] | None = None) -> dict[str, str | None]:
    """``name[type]:value ...`` as test_decoding writes a tuple: text values (quoted with '' escapes),
    ``null``, or unquoted values (numbers, booleans). ``unchanged-toast-datum`` is kept as such."""
    out: dict[str, str | None] = {}
    i, n = 0, len(s)
    while i < n:
        while i < n and s[i] == " ":
            i += 1
        if i >= n:
            break
        name, i = _ident(s, i)
        if not s.startswith("[", i):
            raise ValueError(f"unexpected change format at {s[i:i + 40]!r}")
        j = s.index("]:", i)
        i = j + 2
        if s.startswith("'", i):
            out[name], i = _quoted(s, i, "'")
        else:
            k = s.find(" ", i)
            k = n if k < 0 else k
            v = s[i:k]
            out[name] = None if v == "null" else v
            i = k
        if want is not None and want.issubset(out):
            break  # the key columns come first in most tables: the rest of a long row is not parsed
    return out


@dataclass
class Change:
    table: str            # as written (schema-qualified, maybe quoted)
    action: str           # INSERT UPDATE DELETE TRUNCATE
    old: dict | None      # old key (UPDATE of a key, DELETE)
    new: dict | None      # new tuple (INSERT, UPDATE)


def parse_change(line: str, want: frozenset[str] | set[str] | None = None, head: re.Match | None = None) -> Change | None:
    """One line of test_decoding output; None for BEGIN/COMMIT/messages. With ``want`` (key columns),
    a tuple is parsed only until those are found. ``head``: the line's match of ``_HEAD``, when the
    caller has it already."""
    m = head or _HEAD.match(line)
    if not m:
        return None
    table, action, rest = m.group("table"), m.group("action"), m.group("rest").strip()
    if action == "TRUNCATE":
        return Change(table, action, None, None)
    if rest == "(no-tuple-data)":
        return Change(table, action, None, None)
    if action == "INSERT":
        return Change(table, action, None, parse_fields(rest, want))
    if action == "DELETE":
        return Change(table, action, parse_fields(rest, want), None)
    if rest.startswith("old-key: "):  # UPDATE that changed the key (or with replica identity full)
        old, new = rest[len("old-key: "):].split(" new-tuple: ", 1)
        return Change(table, action, parse_fields(old, want), parse_fields(new, want))
    if rest.startswith("new-tuple: "):
        rest = rest[len("new-tuple: "):]
    return Change(table, action, None, parse_fields(rest, want))


def _bare(qualified: str, schema: str) -> str | None:
    """public.issues -> issues; None for another schema."""
    parts = []
    i = 0
    while i < len(qualified):
        if qualified[i] == '"':
            name, i = _ident(qualified, i)
        else:
            j = qualified.find(".", i)
            j = len(qualified) if j < 0 else j
            name, i = qualified[i:j], j
        parts.append(name)
        i += 1  # the dot
    if len(parts) == 1:
        return parts[0]
    return parts[1] if parts[0] == schema else None


@dataclass
class CapturedChanges:
    """Keys written per table since the slot was created. ``rescan``: tables whose changes could not be
    keyed and need the fallback scan."""
    keys: dict[str, set[tuple]] = field(default_factory=dict)
    rescan: dict[str, str] = field(default_factory=dict)
    changes: int = 0
    upto: str | None = None  # the LSN read up to (transactions committed before it)
    start: str | None = None  # the slot's confirmed point the read started from
    waited: float = 0.0  # seconds the read waited for transactions writing when it began

    def of(self, table: str) -> set[tuple]:
        return self.keys.get(table, set())

    def update(self, other: "CapturedChanges") -> "CapturedChanges":
        for t, keys in other.keys.items():
            self.keys.setdefault(t, set()).update(keys)
        for t, why in other.rescan.items():
            self.rescan.setdefault(t, why)
        self.changes += other.changes
        self.upto = other.upto or self.upto
        return self

    def to_json(self) -> dict:
        return {"keys": {t: sorted(list(k) for k in keys) for t, keys in self.keys.items()}, "rescan": self.rescan}

    @classmethod
    def from_json(cls, data: dict, changes: int = 0, upto: str | None = None) -> "CapturedChanges":
        return cls({t: {tuple(k) for k in keys} for t, keys in data["keys"].items()}, dict(data["rescan"]), changes, upto)


def read_changes(conn: psycopg.Connection, name: str, tables: dict[str, list[str]], schema: str = "public",
                 batch: int = 5000, writers_timeout: float | None = None, ignore: Iterable[str] = ()) -> CapturedChanges:
    """The keys (``tables``: table -> key columns) of every row inserted, updated or deleted on the
    cell since the slot's confirmed point (its creation, or the last :func:`advance`), up to now
    (``upto`` of the result), without consuming the slot. Writes to a partition count for its
    partitioned table. Streams the change lines; only keys are kept. ``ignore``: tables known not to
    matter (the plan's tables never copied).

    ``writers_timeout`` (in the write window, on the source): "now" is after every transaction that
    was writing when the read began has ended (:func:`wait_for_writers`)."""
    out = CapturedChanges()
    wanted = {t: frozenset(k) for t, k in tables.items()}
    row = _slot_and_flush_point(conn, name, schema, writers=writers_timeout is not None)
    if row is None or row[0] == "lost":
        raise CaptureUnavailable(f"replication slot {name} does not exist (dropped or invalidated)")
    partitions: dict[str, str] = row[4] or {}  # each partition of the schema -> its root, read with the slot
    skipped = frozenset(ignore)
    later = object()
    named: dict[str, str | None | object] = {}  # table as written in the stream -> the plan's table (None: not wanted)
    deferred: dict[str, list[str]] = {}  # lines of tables unknown at the start (created since): resolved after

    def planned(written: str):
        if written not in named:
            bare = _bare(written, schema)
            if bare is None or bare in skipped:
                named[written] = None
            elif bare in tables:
                named[written] = bare
            elif bare in partitions:
                named[written] = partitions[bare] if partitions[bare] in tables else None
            else:
                named[written] = later
        return named[written]

    def take(t: str, line: str, head: re.Match | None) -> None:
        ch = parse_change(line, wanted[t], head)
        out.changes += 1
        key = tables[t]
        if ch.action == "TRUNCATE":
            out.rescan[t] = "truncated on the source"
            return
        got = False
        for tup in (ch.old, ch.new):
            if tup and all(c in tup and tup[c] != "unchanged-toast-datum" for c in key):
                out.keys.setdefault(t, set()).add(tuple(tup[c] for c in key))
                got = True
        if not got:
            out.rescan[t] = f"a {ch.action} without its key columns ({', '.join(key)}) in the change stream"

    out.start = row[1]
    upto = row[2]
    if writers_timeout is not None and row[3]:  # their commits come after that flush point: read up to one after them
        out.waited = wait_for_writers(conn, writers_timeout, row[3])
        upto = None
    upto = out.upto = upto or flush_point(conn)
    # streamed ``batch`` rows at a time in one statement (no cursor to declare, fetch from and close;
    # no other statement on the connection until it ends)
    with conn.cursor() as cur:
        try:
            for (line,) in cur.stream("SELECT data FROM pg_logical_slot_peek_changes(%s, %s::pg_lsn, NULL, 'include-xids', "
                                      "'0', 'skip-empty-xacts', '1')", (name, upto), size=batch):
                if not line.startswith("table "):
                    continue
                fast = _FAST.match(line)
                if fast is not None:
                    t = planned(fast.group("table"))
                    if t is None:
                        continue
                    if t is later:
                        deferred.setdefault(fast.group("table"), []).append(line)
                        continue
                    if tables[t] == [fast.group("col")]:
                        out.changes += 1
                        out.keys.setdefault(t, set()).add((fast.group("value"),))
                        continue
                head = _HEAD.match(line)
                t = planned(head.group("table")) if head is not None else None
                if t is later:
                    deferred.setdefault(head.group("table"), []).append(line)
                elif t is not None:
                    take(t, line, head)
        except psycopg.Error as e:
            raise CaptureUnavailable(str(e).strip()) from e
    for written, lines in deferred.items():  # a partition attached since the start counts for its root
        r = conn.execute("SELECT c.relname FROM pg_partition_root(to_regclass(%s)) p JOIN pg_class c ON c.oid = p",
                         (f"{qident(schema)}.{qident(_bare(written, schema))}",)).fetchone()
        if r is not None and r[0] in tables:
            for line in lines:
                take(r[0], line, _HEAD.match(line))
    return out


def qident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'

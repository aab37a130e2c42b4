"""The GitLab-shaped schema and table dictionary that orgmover's local cells run.

``install_schema`` makes an empty database a GitLab-shaped cell: the tables of ``schema.sql``,
every sequence restricted to the cell's id range (16 bits of cell id, 41 bits of sequence, as the
Topology Service assigns them), and the cell-local rows (shards, application_settings, geo_nodes).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import psycopg

SEQUENCE_BITS = 42  # ranges of 2**42 ids: cell 0 is [0, 4398046511103], cell 1 starts at 4398046511104
SCHEMA_VERSION = "20261101000000"
SHARDS = ("default", "storage-2")


def schema_sql() -> str:
    return resources.files(__package__).joinpath("schema.sql").read_text()


def db_docs_dir() -> Path:
    return Path(str(resources.files(__package__).joinpath("db_docs")))


def sequence_range(cell_id: int) -> tuple[int, int]:
    lo = cell_id << SEQUENCE_BITS
    return max(lo, 1), lo + (1 << SEQUENCE_BITS) - 1


def install_schema(dsn: str, cell_id: int, cell_name: str, schema_version: str | None = None) -> None:
    """Create the schema on an empty database (idempotent: does nothing when already installed)."""
    lo, hi = sequence_range(cell_id)
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('public.schema_migrations')").fetchone()[0]:
            return
        conn.execute(schema_sql())
        if schema_version:
            conn.execute("UPDATE schema_migrations SET version = %s", (schema_version,))
        for (seq,) in conn.execute(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename) FROM pg_sequences WHERE schemaname = 'public'"
        ).fetchall():
            conn.execute(f"ALTER SEQUENCE {seq} MINVALUE {lo} MAXVALUE {hi} START WITH {lo} RESTART WITH {lo}")
        for name in SHARDS:
            conn.execute("INSERT INTO shards (name) VALUES (%s)", (name,))
        conn.execute("INSERT INTO application_settings (cell_name) VALUES (%s)", (cell_name,))
        conn.execute("INSERT INTO geo_nodes (name, url, \"primary\") VALUES (%s, %s, true)",
                     (cell_name, f"https://{cell_name}.gitlab.example.com/"))

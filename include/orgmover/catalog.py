"""The live catalog of a cell (tables, columns, keys, foreign keys, partitions, sizes) and the
table dictionary in GitLab's ``db/docs`` format.

The catalog is read from ``pg_catalog`` so the planner works on any schema, not only on the one
orgmover ships. Partitions are folded into their partitioned parent: the mover reads and writes
through the parent, PostgreSQL routes rows to partitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import yaml

from orgmover.errors import ConfigError


@dataclass
class Column:
    name: str
    type: str
    not_null: bool
    generated: bool = False


@dataclass
class ForeignKey:
    name: str
    columns: list[str]
    ref_table: str
    ref_columns: list[str]


@dataclass
class Table:
    name: str
    columns: list[Column]
    primary_key: list[str]
    unique_keys: list[list[str]]
    foreign_keys: list[ForeignKey]
    partitioned: bool = False
    partitions: list[str] = field(default_factory=list)
    est_rows: int = 0
    total_bytes: int = 0

    @property
    def copy_columns(self) -> list[str]:
        """Columns a COPY writes: all but generated ones."""
        return [c.name for c in self.columns if not c.generated]

    @property
    def key(self) -> list[str] | None:
        """The row identity: the primary key, else the first unique key of NOT NULL columns."""
        if self.primary_key:
            return self.primary_key
        notnull = {c.name for c in self.columns if c.not_null}
        for uk in self.unique_keys:
            if all(c in notnull for c in uk):
                return uk
        return None

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass
class Catalog:
    tables: dict[str, Table]
    schema_version: str | None

    def __getitem__(self, name: str) -> Table:
        return self.tables[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tables

    def fingerprint(self) -> list[tuple]:
        """A comparable shape of the schema (tables, columns and types), used by preflight."""
        return sorted((t.name, tuple((c.name, c.type, c.generated) for c in t.columns)) for t in self.tables.values())


_TABLES = """
SELECT c.oid, c.relname, c.relkind = 'p' AS partitioned, greatest(c.reltuples, 0)::bigint,
       CASE WHEN c.relkind = 'p' THEN
         coalesce((SELECT sum(pg_total_relation_size(i.inhrelid)) FROM pg_inherits i WHERE i.inhparent = c.oid), 0)
       ELSE pg_total_relation_size(c.oid) END::bigint,
       CASE WHEN c.relkind = 'p' THEN
         coalesce((SELECT sum(greatest(p.reltuples, 0)) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid
                   WHERE i.inhparent = c.oid), 0)
       ELSE greatest(c.reltuples, 0) END::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname
"""

_COLUMNS = """
SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attgenerated <> ''
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p')
ORDER BY a.attrelid, a.attnum
"""

_CONSTRAINTS = """
SELECT con.conrelid, con.conname, con.contype,
       ARRAY(SELECT att.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute att ON att.attrelid = con.conrelid AND att.attnum = k.attnum ORDER BY k.ord),
       ref.relname,
       ARRAY(SELECT att.attname FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute att ON att.attrelid = con.confrelid AND att.attnum = k.attnum ORDER BY k.ord)
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_class ref ON ref.oid = con.confrelid
WHERE n.nspname = %s AND con.contype IN ('p', 'u', 'f') AND NOT c.relispartition
  AND con.conparentid = 0
ORDER BY con.conrelid, con.conname
"""

_UNIQUE_INDEXES = """
SELECT i.indrelid, ARRAY(SELECT att.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                         JOIN pg_attribute att ON att.attrelid = i.indrelid AND att.attnum = k.attnum ORDER BY k.ord)
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND i.indisunique AND NOT i.indisprimary AND i.indpred IS NULL AND 0 <> ALL (i.indkey)
  AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = i.indexrelid)
"""


def read_catalog(conn: psycopg.Connection, schema: str = "public") -> Catalog:
    """Read tables, columns, keys and foreign keys of ``schema`` from a live cell."""
    tables: dict[int, Table] = {}
    for oid, name, partitioned, _reltuples, total_bytes, est_rows in conn.execute(_TABLES, (schema,)):
        tables[oid] = Table(name=name, columns=[], primary_key=[], unique_keys=[], foreign_keys=[],
                            partitioned=partitioned, est_rows=int(est_rows), total_bytes=int(total_bytes))
    for relid, name, typ, notnull, generated in conn.execute(_COLUMNS, (schema,)):
        if relid in tables:
            tables[relid].columns.append(Column(name, typ, notnull, generated))
    for relid, conname, contype, cols, ref, refcols in conn.execute(_CONSTRAINTS, (schema,)):
        t = tables.get(relid)
        if t is None:
            continue
        if contype == "p":
            t.primary_key = list(cols)
        elif contype == "u":
            t.unique_keys.append(list(cols))
        elif contype == "f":
            t.foreign_keys.append(ForeignKey(conname, list(cols), ref, list(refcols)))
    for relid, cols in conn.execute(_UNIQUE_INDEXES, (schema,)):
        if relid in tables:
            tables[relid].unique_keys.append(list(cols))
    for parent, child in conn.execute(
        "SELECT i.inhparent, c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s ORDER BY c.relname", (schema,)
    ):
        if parent in tables:
            tables[parent].partitions.append(child)
    version = None
    if any(t.name == "schema_migrations" for t in tables.values()):
        row = conn.execute(f"SELECT max(version) FROM {schema}.schema_migrations").fetchone()
        version = row[0] if row else None
    return Catalog({t.name: t for t in tables.values()}, version)


def read_foreign_keys(conn: psycopg.Connection, schema: str = "public") -> Catalog:
    """The tables of ``schema`` with their foreign keys only (no columns, keys or sizes): what the
    foreign-key check needs, at a fraction of :func:`read_catalog`'s cost (it runs in the write window)."""
    tables = {oid: Table(name=name, columns=[], primary_key=[], unique_keys=[], foreign_keys=[])
              for oid, name in conn.execute("SELECT c.oid, c.relname FROM pg_class c JOIN pg_namespace n ON "
                                            "n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind IN ('r', 'p') "
                                            "AND NOT c.relispartition", (schema,))}
    for relid, conname, contype, cols, ref, refcols in conn.execute(_CONSTRAINTS, (schema,)):
        if contype == "f" and relid in tables:
            tables[relid].foreign_keys.append(ForeignKey(conname, list(cols), ref, list(refcols)))
    return Catalog({t.name: t for t in tables.values()}, None)


# ---------------------------------------------------------------- the table dictionary (db/docs)

ORG_SCHEMAS = {"gitlab_main_org", "gitlab_main_cell", "gitlab_main_user", "gitlab_ci", "gitlab_sec"}
CELL_LOCAL_SCHEMAS = {"gitlab_main_cell_local", "gitlab_ci_cell_local", "gitlab_sec_cell_local", "gitlab_shared_cell_local"}
SETTING_SCHEMAS = {"gitlab_main_cell_setting"}
INTERNAL_SCHEMAS = {"gitlab_internal", "gitlab_shared"}
CLUSTERWIDE_SCHEMAS = {"gitlab_main_clusterwide"}
KNOWN_SCHEMAS = ORG_SCHEMAS | CELL_LOCAL_SCHEMAS | SETTING_SCHEMAS | INTERNAL_SCHEMAS | CLUSTERWIDE_SCHEMAS


@dataclass
class DictEntry:
    """One ``db/docs/<table>.yml`` entry (GitLab's keys plus our ``org_mover`` block)."""

    table_name: str
    gitlab_schema: str
    sharding_key: dict[str, str] | None = None
    desired_sharding_key: dict | None = None
    exempt_from_sharding: bool = False
    classes: list[str] = field(default_factory=list)
    table_size: str | None = None
    org_mover: dict = field(default_factory=dict)
    path: str | None = None


def load_dictionary(path: str | Path) -> dict[str, DictEntry]:
    """Load every ``*.yml`` of a ``db/docs`` directory; a bad file is a clear error."""
    d = Path(path)
    if not d.is_dir():
        raise ConfigError(f"table dictionary directory {d} does not exist")
    out: dict[str, DictEntry] = {}
    for f in sorted(d.glob("*.yml")):
        try:
            doc = yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"table dictionary file {f} is not valid YAML: {e}") from e
        name = doc.get("table_name")
        if not name or not doc.get("gitlab_schema"):
            raise ConfigError(f"table dictionary file {f} needs table_name and gitlab_schema")
        if doc["gitlab_schema"] not in KNOWN_SCHEMAS:
            raise ConfigError(f"{f}: unknown gitlab_schema {doc['gitlab_schema']!r}")
        out[name] = DictEntry(
            table_name=name, gitlab_schema=doc["gitlab_schema"], sharding_key=doc.get("sharding_key"),
            desired_sharding_key=doc.get("desired_sharding_key"),
            exempt_from_sharding=bool(doc.get("exempt_from_sharding")), classes=list(doc.get("classes") or []),
            table_size=doc.get("table_size"), org_mover=dict(doc.get("org_mover") or {}), path=str(f),
        )
    return out

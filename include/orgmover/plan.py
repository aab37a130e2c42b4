"""Plan: decide, for every table of a cell, how the rows of one organization are selected.

Inputs are the live catalog of the source cell and the table dictionary (``db/docs``). For each
table the plan holds a SQL predicate over alias ``t`` that selects exactly the organization's rows,
the same on every cell, so copy, validation, rollback and cleanup share one definition.

Strategies
  ``org``     rows owned by the organization: copied, validated, later removed from the source.
  ``shared``  cell-local or cluster-wide rows that org rows reference (users, lfs_objects,
              pool_repositories, shards). They are matched on the target by ``match_on``; missing ones
              are inserted when ``insert_missing`` (else preflight fails), and columns of other tables
              that reference them are remapped to the target's row.
  ``skip``    never copied: per-cell settings, operational cell-local tables, framework tables.

How org rows are found, in order of precedence (the dictionary overrides inference):
  1. the dictionary's ``sharding_key`` (several nullable keys are OR-ed),
  2. the dictionary's ``org_mover.polymorphic`` owners (type + id columns),
  3. ``desired_sharding_key.backfill_via.parent`` (a foreign key to the parent),
  4. inferred: a NOT NULL foreign key to an org table, else all nullable ones OR-ed (and with the
     polymorphic owners of 5, if any: a row whose nullable keys are all NULL is still found),
  5. inferred: polymorphic ``<x>_type``/``<x>_id`` columns, type values read from the data and
     mapped to tables through the dictionary's ``classes``,
  6. inferred: a self-referencing tree (``parent_id``) whose roots are selected by 1-5.
Anything else is a classification error naming the table and why.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import psycopg

from orgmover.catalog import (
    CELL_LOCAL_SCHEMAS, CLUSTERWIDE_SCHEMAS, INTERNAL_SCHEMAS, ORG_SCHEMAS, SETTING_SCHEMAS,
    Catalog, DictEntry, Table,
)
from orgmover.errors import ClassificationError


def qi(name: str) -> str:
    """Quote an identifier."""
    return '"' + name.replace('"', '""') + '"'


def ql(value: object) -> str:
    """Quote a text literal."""
    return "'" + str(value).replace("'", "''") + "'"


@dataclass
class Remap:
    """A column that references a shared table matched by a non-key column (e.g. shard_id -> shards.name)."""

    column: str
    table: str            # the shared table
    ref_column: str       # its id column
    match_on: list[str]   # columns identifying the row on every cell
    value_map: dict = field(default_factory=dict)  # configured: source match value -> target match value


@dataclass
class TablePlan:
    table: str
    strategy: str                       # org | shared | skip
    how: str                            # human-readable: how rows are selected, or why skipped
    where: str = "false"                # predicate over alias t, organization id inlined
    columns: list[str] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    match_on: list[str] = field(default_factory=list)
    insert_missing: bool = False
    compare_columns: list[str] = field(default_factory=list)
    remaps: list[Remap] = field(default_factory=list)
    encrypted: list[dict] = field(default_factory=list)
    depends_on: list[str] = field(default_factory=list)
    est_rows: int = 0
    est_bytes: int = 0
    inferred: bool = False
    value_map: dict = field(default_factory=dict)  # shared tables: configured source -> target match value
    where_key: str | None = None        # ``where`` for rows already picked by key (see :meth:`picked_sql`)
    key_types: list[str] = field(default_factory=list)  # SQL types of ``key``, as format_type() writes them
    # the org rows this table's rows belong to the organization through: {"columns", "table", "ref_columns",
    # "when": [type column, value] or None}; a row whose parent joins or leaves the org does too
    parents: list[dict] = field(default_factory=list)

    def select_sql(self, columns: list[str] | None = None) -> str:
        cols = ", ".join(f"t.{qi(c)}" for c in (columns or self.columns))
        return f"SELECT {cols} FROM {qi(self.table)} t WHERE {self.where}"

    def picked_sql(self, cond: str, columns: str = "t.*") -> str:
        """SELECT of the organization's rows among the few that ``cond`` (a key filter over alias t)
        picks: the rows are fetched by key first and the organization predicate is checked on those
        alone, parent by parent (``where_key``). The fence (OFFSET 0) keeps PostgreSQL from starting at
        the organization's parent rows, which it does when their statistics are stale, and the cost
        follows the number of keys, not the organization's size."""
        return (f"SELECT {columns} FROM (SELECT * FROM {qi(self.table)} t WHERE {cond} OFFSET 0) t "
                f"WHERE {self.where_key or self.where}")

    @property
    def needs_transform(self) -> bool:
        return bool(self.remaps or self.encrypted)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TablePlan":
        d = dict(d)
        d["remaps"] = [Remap(**r) for r in d.get("remaps", [])]
        if "where_row" in d:  # plans recorded by earlier versions: the plain-OR form, also correct for rows picked by key
            d["where_key"] = d.pop("where_row")
        return cls(**d)


@dataclass
class Plan:
    organization_id: int
    tables: dict[str, TablePlan]
    warnings: list[str] = field(default_factory=list)
    schema_version: str | None = None

    def apply_value_maps(self, maps: dict[str, dict[str, str]] | None) -> None:
        """Configured mappings of shared rows matched on one column, e.g. {"shards": {"nfs-01": "default"}}:
        a source row whose match value is mapped is matched with the target row of the mapped value."""
        for table, vm in (maps or {}).items():
            tp = self.tables.get(table)
            if tp is None or tp.strategy != "shared" or len(tp.match_on) != 1:
                raise ClassificationError(f"a value mapping is configured for {table}, which is not a shared table "
                                          f"matched on one column")
            tp.value_map = {str(k): str(v) for k, v in vm.items()}
            for other in self.tables.values():
                for r in other.remaps:
                    if r.table == table:
                        r.value_map = tp.value_map

    def of(self, strategy: str) -> list[TablePlan]:
        return [p for p in self.tables.values() if p.strategy == strategy]

    def children(self, table: str) -> list[tuple[TablePlan, dict]]:
        """(child table, edge) of the org tables whose rows belong to the org through a row of ``table``."""
        return [(p, e) for p in self.tables.values() if p.strategy == "org" for e in p.parents if e["table"] == table]

    def shared_in_order(self) -> list[TablePlan]:
        """Shared tables, the ones others depend on first (shards before pool_repositories)."""
        done: list[str] = []
        pending = {p.table: p for p in self.of("shared")}
        while pending:
            ready = [n for n, p in pending.items() if all(d in done or d not in pending for d in p.depends_on)]
            if not ready:
                ready = [sorted(pending)[0]]
            for n in sorted(ready):
                done.append(n)
                pending.pop(n)
        return [self.tables[n] for n in done]

    def to_dict(self) -> dict:
        return {"organization_id": self.organization_id, "schema_version": self.schema_version,
                "warnings": self.warnings, "tables": {k: v.to_dict() for k, v in self.tables.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(organization_id=d["organization_id"], schema_version=d.get("schema_version"),
                   warnings=list(d.get("warnings", [])),
                   tables={k: TablePlan.from_dict(v) for k, v in d["tables"].items()})


def _tableize(class_name: str) -> str:
    """Rails' tableize for the common cases: Namespaces::ProjectNamespace -> project_namespaces."""
    base = class_name.split("::")[-1]
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower()
    if snake.endswith("y") and not snake.endswith(("ay", "ey", "oy", "uy")):
        return snake[:-1] + "ies"
    if snake.endswith(("s", "x", "ch", "sh")):
        return snake + "es"
    return snake + "s"


# Ends every EXISTS of the keyed predicates: with an OFFSET, PostgreSQL neither turns the EXISTS into a
# join nor into a hashed set of all the org's parents; it stays one index lookup per picked row, whatever
# the statistics say (stale right after a bulk copy, they made it start from the parents: 0.44 s for 249 rows)
_KEYED = " OFFSET 0"


class Planner:
    """Builds a :class:`Plan` for one organization from a catalog and a dictionary."""

    def __init__(self, catalog: Catalog, dictionary: dict[str, DictEntry], conn: psycopg.Connection | None = None):
        self.catalog = catalog
        self.dictionary = dictionary
        self.conn = conn  # used only to read the type values of inferred polymorphic columns
        self._class_to_table: dict[str, str] = {}
        for e in dictionary.values():
            for c in e.classes:
                self._class_to_table[c] = e.table_name
                self._class_to_table[c.split("::")[-1]] = e.table_name
        self._strategy: dict[str, str] = {}
        self._pred: dict[str, tuple[str, str, bool]] = {}   # table -> (predicate template with {a}, how, inferred)
        self._types: dict[tuple[str, str], list[str]] = {}   # distinct values of polymorphic type columns
        # the keyed planner: the same predicates written for rows already picked by key (correlated
        # EXISTS per parent, plain OR instead of UNION); see TablePlan.picked_sql
        self.keyed = False
        self._base: Planner | None = None
        self._visiting: set[str] = set()
        self._deriving: list[str] = []   # the tables whose predicates are being derived (innermost last)
        self.edges: dict[str, list[dict]] = {}   # table -> its parents (see TablePlan.parents)
        self._alias = 0
        self.errors: list[str] = []
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ strategy per table
    def strategy(self, table: str) -> str:
        if table in self._strategy:
            return self._strategy[table]
        e = self.dictionary.get(table)
        s = "org"
        if e is not None:
            explicit = e.org_mover.get("strategy")
            if explicit:
                s = explicit
            elif e.gitlab_schema in ORG_SCHEMAS:
                s = "org"
            elif e.gitlab_schema in SETTING_SCHEMAS | INTERNAL_SCHEMAS:
                s = "skip"
            elif e.gitlab_schema in CELL_LOCAL_SCHEMAS | CLUSTERWIDE_SCHEMAS:
                s = "unclassified"
        if s not in ("org", "shared", "skip", "unclassified"):
            raise ClassificationError(f"table {table}: unknown org_mover.strategy {s!r} (use org, shared or skip)")
        self._strategy[table] = s
        return s

    def _next_alias(self) -> str:
        self._alias += 1
        return f"{'k' if self.keyed else 't'}{self._alias}"

    # ------------------------------------------------------------------ predicates
    def predicate(self, table: str, alias: str, org_id: int) -> str:
        tpl, _, _ = self._predicate_template(table)
        return tpl.replace("{a}", alias).replace("{org}", str(int(org_id)))

    def _ref_column(self, t: Table, col: str, ref_table: str) -> str:
        for fk in t.foreign_keys:
            if fk.columns == [col] and fk.ref_table == ref_table:
                return fk.ref_columns[0]
        ref = self.catalog.tables.get(ref_table)
        if ref and len(ref.primary_key) == 1:
            return ref.primary_key[0]
        return "id"

    def _edge(self, columns: list[str], ref_table: str, ref_columns: list[str], when: list[str] | None = None) -> None:
        if self._deriving:
            edge = {"columns": list(columns), "table": ref_table, "ref_columns": list(ref_columns), "when": when}
            edges = self.edges.setdefault(self._deriving[-1], [])
            if edge not in edges:
                edges.append(edge)

    def _via(self, col: str, ref_table: str, ref_col: str, when: list[str] | None = None) -> str:
        """Predicate template: {a}.col references an org row of ref_table (``when``: [type column, value]
        of a polymorphic owner, recorded with the edge)."""
        tpl, _, _ = self._predicate_template(ref_table)
        root = self._root_column(ref_table)
        if root is not None and root == ref_col:
            return f"{{a}}.{qi(col)} = {{org}}"
        self._edge([col], ref_table, [ref_col], when)
        b = self._next_alias()
        inner = tpl.replace("{a}", b)
        if self.keyed:  # one index lookup per picked row and parent (see _KEYED)
            return f"EXISTS (SELECT 1 FROM {qi(ref_table)} {b} WHERE {b}.{qi(ref_col)} = {{a}}.{qi(col)} AND {inner}{_KEYED})"
        return f"{{a}}.{qi(col)} IN (SELECT {b}.{qi(ref_col)} FROM {qi(ref_table)} {b} WHERE {inner})"

    def _root_column(self, table: str) -> str | None:
        e = self.dictionary.get(table)
        if e and e.sharding_key and len(e.sharding_key) == 1:
            col, ref = next(iter(e.sharding_key.items()))
            if ref == table:
                return col
        return None

    def _polymorphic(self, table: str, type_col: str, id_col: str, types: dict[str, str] | None) -> tuple[str, str]:
        t = self.catalog.tables[table]
        if types is None:
            values = self._distinct_types(table, type_col)
            types = {}
            unknown = []
            for v in values:
                target = self._class_to_table.get(v) or (_tableize(v) if _tableize(v) in self.catalog.tables else None)
                if target is None:
                    unknown.append(v)
                else:
                    types[v] = target
            if unknown:
                raise ClassificationError(
                    f"table {table}: polymorphic column {type_col} has values {sorted(unknown)} that map to no table "
                    f"(add them to a table's 'classes' in the dictionary or declare org_mover.polymorphic types)")
        parts, hows = [], []
        for value, target in sorted(types.items()):
            if target not in self.catalog.tables:
                raise ClassificationError(f"table {table}: polymorphic type {value!r} maps to unknown table {target}")
            if self.strategy(target) != "org":
                hows.append(f"{value} -> {target} (not org data, excluded)")
                continue
            ref_col = self.catalog.tables[target].primary_key[0] if len(self.catalog.tables[target].primary_key) == 1 else "id"
            parts.append(f"({{a}}.{qi(type_col)} = {ql(value)} AND {self._via(id_col, target, ref_col, [type_col, value])})")
            hows.append(f"{value} -> {target}")
        if t.column(type_col) is None or t.column(id_col) is None:
            raise ClassificationError(f"table {table}: polymorphic columns {type_col}/{id_col} do not exist")
        expr = self._any_of(table, parts) if parts else "false"
        return expr, f"polymorphic {type_col}/{id_col}: " + ", ".join(hows)

    def _any_of(self, table: str, parts: list[str]) -> str:
        """OR of predicate templates, written as the key IN a UNION of one semi-join per branch: each branch
        can then start from the organization's few parent rows and use an index, so the cost follows the
        organization, not the cell (a plain OR of IN-subqueries makes PostgreSQL scan the whole table)."""
        if len(parts) == 1:
            return parts[0]
        key = self.catalog.tables[table].key
        if not key or self.keyed:
            return "(" + " OR ".join(parts) + ")"
        b = self._next_alias()
        cols = ", ".join(f"{b}.{qi(c)}" for c in key)
        branches = " UNION ".join(f"SELECT {cols} FROM {qi(table)} {b} WHERE {p.replace('{a}', b)}" for p in parts)
        lhs = f"{{a}}.{qi(key[0])}" if len(key) == 1 else "(" + ", ".join(f"{{a}}.{qi(c)}" for c in key) + ")"
        return f"{lhs} IN ({branches})"

    def _distinct_types(self, table: str, type_col: str) -> list[str]:
        if self.conn is None:
            return []
        if (table, type_col) not in self._types:
            rows = self.conn.execute(f"SELECT DISTINCT {qi(type_col)} FROM {qi(table)} WHERE {qi(type_col)} IS NOT NULL").fetchall()
            self._types[(table, type_col)] = sorted(r[0] for r in rows)
        return self._types[(table, type_col)]

    def _predicate_template(self, table: str) -> tuple[str, str, bool]:
        if table in self._pred:
            return self._pred[table]
        if table in self._visiting:
            raise ClassificationError(f"table {table}: its sharding keys form a cycle")
        if table not in self.catalog.tables:
            raise ClassificationError(f"table {table}: referenced by the dictionary but not in the schema")
        self._visiting.add(table)
        self._deriving.append(table)
        try:
            result = self._derive(table)
        finally:
            self._visiting.discard(table)
            self._deriving.pop()
        self._pred[table] = result
        return result

    def _derive(self, table: str) -> tuple[str, str, bool]:
        t = self.catalog.tables[table]
        e = self.dictionary.get(table)
        # 1. sharding key from the dictionary
        if e and e.sharding_key:
            parts, hows = [], []
            for col, ref in e.sharding_key.items():
                if t.column(col) is None:
                    raise ClassificationError(f"table {table}: sharding_key column {col} does not exist")
                if ref == table:
                    parts.append(f"{{a}}.{qi(col)} = {{org}}")
                    hows.append(f"{col} = organization id (root)")
                    continue
                if ref not in self.catalog.tables:
                    raise ClassificationError(f"table {table}: sharding_key {col} references unknown table {ref}")
                parts.append(self._via(col, ref, self._ref_column(t, col, ref)))
                hows.append(f"{col} -> {ref}")
            expr = self._any_of(table, parts)
            return expr, "sharding key " + " or ".join(hows), False
        # 2. declared polymorphic owners
        if e and e.org_mover.get("polymorphic"):
            parts, hows = [], []
            for p in e.org_mover["polymorphic"]:
                expr, how = self._polymorphic(table, p["type_column"], p["id_column"], p.get("types"))
                parts.append(expr)
                hows.append(how)
            return self._any_of(table, parts), "; ".join(hows), False
        # 3. desired sharding key: backfill via a parent
        if e and e.desired_sharding_key:
            for spec in e.desired_sharding_key.values():
                parent = (spec or {}).get("backfill_via", {}).get("parent", {})
                col, ptable = parent.get("foreign_key"), parent.get("table")
                if col and ptable and t.column(col) is not None and ptable in self.catalog.tables:
                    return self._via(col, ptable, self._ref_column(t, col, ptable)), f"desired sharding key via {col} -> {ptable}", False
        # 4. inferred from foreign keys to org tables
        org_fks = [fk for fk in t.foreign_keys
                   if len(fk.columns) == 1 and fk.ref_table != table and self.strategy(fk.ref_table) == "org"]
        notnull = [fk for fk in org_fks if t.column(fk.columns[0]).not_null]
        if notnull:
            fk = sorted(notnull, key=lambda f: f.name)[0]
            return (self._via(fk.columns[0], fk.ref_table, fk.ref_columns[0]),
                    f"inferred: foreign key {fk.columns[0]} -> {fk.ref_table}", True)
        multi = [fk for fk in t.foreign_keys if len(fk.columns) > 1 and self.strategy(fk.ref_table) == "org"
                 and all(t.column(c).not_null for c in fk.columns)]
        if multi:
            fk = multi[0]
            b = self._next_alias()
            inner = self._predicate_template(fk.ref_table)[0].replace("{a}", b)
            self._edge(fk.columns, fk.ref_table, fk.ref_columns)
            cols = ", ".join(f"{{a}}.{qi(c)}" for c in fk.columns)
            refs = ", ".join(f"{b}.{qi(c)}" for c in fk.ref_columns)
            if self.keyed:
                match = " AND ".join(f"{b}.{qi(r)} = {{a}}.{qi(c)}" for c, r in zip(fk.columns, fk.ref_columns))
                return (f"EXISTS (SELECT 1 FROM {qi(fk.ref_table)} {b} WHERE {match} AND {inner}{_KEYED})",
                        f"inferred: foreign key ({', '.join(fk.columns)}) -> {fk.ref_table}", True)
            return (f"({cols}) IN (SELECT {refs} FROM {qi(fk.ref_table)} {b} WHERE {inner})",
                    f"inferred: foreign key ({', '.join(fk.columns)}) -> {fk.ref_table}", True)
        self_fks = [fk for fk in t.foreign_keys if fk.ref_table == table and len(fk.columns) == 1]
        if org_fks and self_fks and self.keyed:  # the tree is walked as a set, from its roots
            return self._base._predicate_template(table)
        if org_fks and self_fks:
            # a self-referencing tree: roots carry the org link, descendants reach it through the parent chain
            parent = self_fks[0]
            self._edge([parent.columns[0]], table, [parent.ref_columns[0]])  # a subtree moves with its root
            roots = " OR ".join(self._via(fk.columns[0], fk.ref_table, fk.ref_columns[0]).replace("{a}", "r")
                                for fk in org_fks)
            key = parent.ref_columns[0]
            tree = (f"{{a}}.{qi(key)} IN (WITH RECURSIVE _tree AS (SELECT r.{qi(key)} FROM {qi(table)} r WHERE {roots} "
                    f"UNION SELECT c.{qi(key)} FROM {qi(table)} c JOIN _tree ON c.{qi(parent.columns[0])} = _tree.{qi(key)}) "
                    f"SELECT {qi(key)} FROM _tree)")
            return (tree, f"inferred: tree via {parent.columns[0]} from roots with "
                          + " or ".join(f"{fk.columns[0]} -> {fk.ref_table}" for fk in org_fks), True)
        names = {c.name for c in t.columns}
        pairs = sorted(n[:-5] for n in names if n.endswith("_type") and n[:-5] + "_id" in names)
        if org_fks:
            # a row whose nullable keys are all NULL is found only through its polymorphic owner, if it has one
            parts = [self._via(fk.columns[0], fk.ref_table, fk.ref_columns[0]) for fk in org_fks]
            hows = [f"{fk.columns[0]} -> {fk.ref_table}" for fk in org_fks]
            for p in pairs:
                expr, how = self._polymorphic(table, p + "_type", p + "_id", None)
                parts.append(expr)
                hows.append(how)
            return self._any_of(table, parts), "inferred: any of " + ", ".join(hows), True
        # 5. inferred polymorphic owner columns
        if pairs:
            parts, hows = [], []
            for p in pairs:
                expr, how = self._polymorphic(table, p + "_type", p + "_id", None)
                parts.append(expr)
                hows.append(how)
            return self._any_of(table, parts), "inferred " + "; ".join(hows), True
        # 6. self-referencing tree whose roots carry a key we cannot see: not derivable
        raise ClassificationError(
            f"table {table}: cannot tell which organization its rows belong to (no sharding_key in the dictionary, "
            f"no polymorphic owner, no foreign key to organization data)")

    # ------------------------------------------------------------------ shared tables
    def _shared_references(self, table: str) -> list[tuple[str, str, str]]:
        """(child table, child column, referenced column) of org/shared tables pointing at ``table``."""
        refs = []
        for child in self.catalog.tables.values():
            if child.name == table or self.strategy(child.name) not in ("org", "shared"):
                continue
            for fk in child.foreign_keys:
                if fk.ref_table == table and len(fk.columns) == 1:
                    # a shared row referencing org data of possibly another organization does not make it ours
                    if self.strategy(child.name) == "shared" and self.strategy(table) == "org":
                        continue
                    refs.append((child.name, fk.columns[0], fk.ref_columns[0]))
        return sorted(refs)

    def _shared_predicate(self, table: str, org_id: int, stack: tuple[str, ...] = (), alias: str = "t") -> str:
        parts = []
        for child, col, ref_col in self._shared_references(table):
            b = self._next_alias()
            if self.strategy(child) == "org":
                inner = self.predicate(child, b, org_id)
            elif child in stack:
                continue
            else:
                inner = self._shared_predicate(child, org_id, stack + (table,), alias=b)
            parts.append((ref_col, f"SELECT {b}.{qi(col)} FROM {qi(child)} {b} WHERE {inner}"))
        by_col: dict[str, list[str]] = {}
        for ref_col, sel in parts:
            by_col.setdefault(ref_col, []).append(sel)
        ors = [f"{alias}.{qi(c)} IN ({' UNION '.join(sels)})" for c, sels in sorted(by_col.items())]
        return ("(" + " OR ".join(ors) + ")" if len(ors) > 1 else ors[0]) if ors else "false"

    # ------------------------------------------------------------------ the plan
    def _keyed_planner(self) -> "Planner":
        k = Planner(self.catalog, self.dictionary, self.conn)
        k.keyed, k._base, k._types = True, self, self._types
        return k

    def build(self, org_id: int) -> Plan:
        plans: dict[str, TablePlan] = {}
        keyed = self._keyed_planner()
        errors: list[str] = []
        for name in sorted(self.dictionary):
            if name not in self.catalog.tables:
                self.warnings.append(f"dictionary lists {name}, which is not in the schema")
        for name, t in sorted(self.catalog.tables.items()):
            e = self.dictionary.get(name)
            try:
                s = self.strategy(name)
                if e is None:
                    self.warnings.append(f"table {name} is not in the table dictionary; its selection was inferred")
                if s == "unclassified":
                    raise ClassificationError(
                        f"table {name}: {e.gitlab_schema} table without an org_mover.strategy (shared or skip); "
                        f"exempt tables need an explicit strategy, they are never skipped silently")
                if s == "skip":
                    plans[name] = TablePlan(name, "skip", f"never copied ({e.gitlab_schema if e else 'skip'})",
                                            est_rows=t.est_rows, est_bytes=t.total_bytes)
                    continue
                key = t.key
                if key is None:
                    raise ClassificationError(f"table {name}: no primary key and no unique key of NOT NULL columns")
                key_types = [t.column(c).type for c in key]
                enc = list((e.org_mover.get("encrypted_columns") if e else None) or [])
                for spec in enc:
                    for c in (spec["column"], spec.get("iv_column")):
                        if c and t.column(c) is None:
                            raise ClassificationError(f"table {name}: encrypted column {c} does not exist")
                if s == "org":
                    tpl, how, inferred = self._predicate_template(name)
                    where = tpl.replace("{a}", "t").replace("{org}", str(int(org_id)))
                    key_tpl = keyed._predicate_template(name)[0]
                    plans[name] = TablePlan(name, "org", how, where, t.copy_columns, key, encrypted=enc, inferred=inferred,
                                            key_types=key_types, parents=self.edges.get(name, []), where_key=key_tpl.replace("{a}", "t").replace("{org}", str(int(org_id))))
                else:  # shared
                    match_on = list(e.org_mover.get("match_on") or key)
                    plans[name] = TablePlan(
                        name, "shared", "", self._shared_predicate(name, org_id), t.copy_columns, key,
                        match_on=match_on, insert_missing=bool(e.org_mover.get("insert_missing", True)),
                        compare_columns=list(e.org_mover.get("compare_columns") or []), encrypted=enc,
                        key_types=key_types)
                    refs = self._shared_references(name)
                    plans[name].how = (f"shared, matched on {', '.join(match_on)}; "
                                       f"{'missing rows inserted' if plans[name].insert_missing else 'must exist on the target'}; "
                                       f"referenced by " + ", ".join(f"{c}.{col}" for c, col, _ in refs))
            except ClassificationError as err:
                errors.extend(err.problems)
        if errors:
            raise ClassificationError(errors)
        # remaps: columns referencing shared tables that are matched on something else than their key
        for p in plans.values():
            if p.strategy == "skip":
                continue
            t = self.catalog.tables[p.table]
            for fk in t.foreign_keys:
                target = plans.get(fk.ref_table)
                if target is None or target.strategy != "shared" or len(fk.columns) != 1 or fk.ref_table == p.table:
                    continue
                if target.match_on != fk.ref_columns:
                    p.remaps.append(Remap(fk.columns[0], fk.ref_table, fk.ref_columns[0], target.match_on))
                if p.strategy == "shared":
                    p.depends_on.append(fk.ref_table)
        for p in plans.values():
            if p.strategy == "shared" and not p.compare_columns:
                skip = {s["column"] for s in p.encrypted} | {s.get("iv_column") for s in p.encrypted}
                p.compare_columns = [c for c in p.columns if c not in skip]
        return Plan(org_id, plans, warnings=self.warnings, schema_version=self.catalog.schema_version)


def build_plan(conn: psycopg.Connection, dictionary: dict[str, DictEntry], org_id: int, catalog: Catalog | None = None) -> Plan:
    from orgmover.catalog import read_catalog

    catalog = catalog or read_catalog(conn)
    return Planner(catalog, dictionary, conn).build(org_id)

"""The planner on a schema it was not written for: a small helpdesk SaaS (tests/second_schema).

Each cell's PostgreSQL cluster gets a separate ``helpdesk`` database with that schema, sequences
restricted to the cell's id range, and the same cell-local lookup rows (priorities) under different
ids. Three accounts are seeded on legacy; one is moved with the real phases (``run_move``) and checked
with hand-written SQL per table, independent of the planner's predicates.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from orgmover import gitlab
from orgmover.catalog import load_dictionary, read_catalog
from orgmover.cells import Cell
from orgmover.cli import run_move
from orgmover.mover import MoveContext, dry_run, run_checks
from orgmover.plan import Planner

HERE = Path(__file__).resolve().parent / "second_schema"
DOCS = HERE / "db_docs"
DB = "helpdesk"
CELLS = ("legacy", "cell-1")
ACCOUNTS = (7000001, 7000002, 7000003)
MOVED, DRY = 7000002, 7000003
# code, label, weight: the same on both cells, inserted in a different order so the ids differ too
PRIORITIES = [("low", "Low", 10), ("normal", "Normal", 20), ("high", "High", 30), ("urgent", "Urgent", 40)]
BASE = datetime(2024, 3, 1, 9, 0, tzinfo=timezone.utc)

# table -> (strategy, inferred)
EXPECTED = {
    "accounts": ("org", False),
    "agents": ("org", False),
    "customers": ("org", True),
    "tickets": ("org", False),
    "ticket_comments": ("org", True),
    "comment_reactions": ("org", True),
    "attachments": ("org", True),
    "tags": ("org", False),
    "ticket_tags": ("org", True),
    "teams": ("org", True),
    "team_memberships": ("org", True),
    "sla_policies": ("org", True),
    "ticket_events": ("org", False),
    "canned_responses": ("org", True),
    "priorities": ("shared", False),
    "desk_settings": ("skip", False),
    "schema_migrations": ("skip", False),
}

# Hand-written selection of one account's rows per org table (%(a)s = account id); not the planner's.
_TREE = """WITH RECURSIVE tree AS (SELECT id FROM teams WHERE account_id = %(a)s
           UNION ALL SELECT c.id FROM teams c JOIN tree ON c.parent_team_id = tree.id)"""
_TICKETS = "SELECT id FROM tickets WHERE account_id = %(a)s"
_COMMENTS = f"SELECT id FROM ticket_comments WHERE ticket_id IN ({_TICKETS})"
ACCOUNT_ROWS = {
    "accounts": "SELECT x.* FROM accounts x WHERE x.id = %(a)s",
    "agents": "SELECT x.* FROM agents x WHERE x.account_id = %(a)s",
    "customers": "SELECT x.* FROM customers x WHERE x.account_id = %(a)s",
    "tags": "SELECT x.* FROM tags x WHERE x.account_id = %(a)s",
    "tickets": "SELECT x.* FROM tickets x WHERE x.account_id = %(a)s",
    "ticket_comments": f"SELECT x.* FROM ticket_comments x WHERE x.ticket_id IN ({_TICKETS})",
    "comment_reactions": f"SELECT x.* FROM comment_reactions x WHERE x.comment_id IN ({_COMMENTS})",
    "attachments": f"""SELECT x.* FROM attachments x
        WHERE (x.attachable_type = 'Ticket' AND x.attachable_id IN ({_TICKETS}))
           OR (x.attachable_type IN ('TicketComment', 'Helpdesk::InternalNote') AND x.attachable_id IN ({_COMMENTS}))""",
    "ticket_tags": f"SELECT x.* FROM ticket_tags x WHERE x.ticket_id IN ({_TICKETS})",
    "teams": f"{_TREE} SELECT x.* FROM teams x WHERE x.id IN (SELECT id FROM tree)",
    "team_memberships": f"{_TREE} SELECT x.* FROM team_memberships x WHERE x.team_id IN (SELECT id FROM tree)",
    "sla_policies": f"{_TREE} SELECT x.* FROM sla_policies x WHERE x.team_id IN (SELECT id FROM tree)",
    "ticket_events": "SELECT x.* FROM ticket_events x WHERE x.account_id = %(a)s",
    "canned_responses": "SELECT x.* FROM canned_responses x WHERE x.agent_id IN "
                        "(SELECT id FROM agents WHERE account_id = %(a)s)",
}


def helpdesk_uri(dsn: str) -> str:
    return urlsplit(dsn)._replace(path="/" + DB).geturl()


# ------------------------------------------------------------------------------------------ setup
def _create(devenv, name: str) -> str:
    cell = devenv.resolve_cell(name)
    with psycopg.connect(cell.dsn, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    uri = helpdesk_uri(cell.dsn)
    lo, hi = gitlab.sequence_range(cell.id)
    with psycopg.connect(uri) as c:
        c.execute((HERE / "schema.sql").read_text())
        seqs = c.execute("SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename) FROM pg_sequences "
                         "WHERE schemaname = 'public'").fetchall()
        for (seq,) in seqs:
            c.execute(f"ALTER SEQUENCE {seq} MINVALUE {lo} MAXVALUE {hi} START WITH {lo} RESTART WITH {lo}")
        order = PRIORITIES if name == "legacy" else list(reversed(PRIORITIES))
        for code, label, weight in order:
            c.execute("INSERT INTO priorities (code, label, weight) VALUES (%s, %s, %s)", (code, label, weight))
        c.execute("INSERT INTO desk_settings (cell_name, smtp_relay, updated_at) VALUES (%s, %s, %s)",
                  (name, f"smtp.{name}.helpdesk.example", BASE))
    return uri


def _seed(uri: str) -> dict[int, dict[str, int]]:
    """Three accounts with rows in every table; returns account -> table -> rows created."""
    rnd = random.Random(20250612)
    created: dict[int, dict[str, int]] = {}
    with psycopg.connect(uri) as c:
        prio = dict(c.execute("SELECT code, id FROM priorities").fetchall())
        for k, acc in enumerate(ACCOUNTS, 1):
            n: dict[str, int] = {t: 0 for t in ACCOUNT_ROWS}

            def add(table: str, sql: str, params: tuple) -> int | None:
                n[table] += 1
                if table in ("sla_policies", "ticket_tags"):  # no id column
                    c.execute(sql, params)
                    return None
                return c.execute(sql + " RETURNING id", params).fetchone()[0]

            c.execute("INSERT INTO accounts (id, name, subdomain, plan, created_at) VALUES (%s, %s, %s, %s, %s)",
                      (acc, f"Account {k}", f"acct{k}", ("basic", "pro", "enterprise")[k - 1], BASE + timedelta(days=k)))
            n["accounts"] += 1
            agents = [add("agents", "INSERT INTO agents (account_id, email, display_name, is_admin) VALUES (%s, %s, %s, %s)",
                          (acc, f"agent{i}@acct{k}.example", f"Agent {k}-{i}", i == 0)) for i in range(4 + k)]
            customers = [add("customers", "INSERT INTO customers (account_id, email, full_name) VALUES (%s, %s, %s)",
                             (acc, f"customer{i}@client{k}.example", None if i % 4 == 3 else f"Customer {k}-{i}"))
                         for i in range(6 + k)]
            tags = [add("tags", "INSERT INTO tags (account_id, name) VALUES (%s, %s)", (acc, name))
                    for name in ("billing", "bug", "feature", "vip")[: 2 + k]]
            # teams: two roots (account_id set); sub-teams and a grandchild (account_id NULL)
            support = add("teams", "INSERT INTO teams (account_id, parent_team_id, name) VALUES (%s, NULL, %s)", (acc, "Support"))
            billing = add("teams", "INSERT INTO teams (account_id, parent_team_id, name) VALUES (%s, NULL, %s)", (acc, "Billing"))
            tier1 = add("teams", "INSERT INTO teams (account_id, parent_team_id, name) VALUES (NULL, %s, %s)", (support, "Tier 1"))
            tier2 = add("teams", "INSERT INTO teams (account_id, parent_team_id, name) VALUES (NULL, %s, %s)", (support, "Tier 2"))
            esc = add("teams", "INSERT INTO teams (account_id, parent_team_id, name) VALUES (NULL, %s, %s)", (tier2, "Escalations"))
            teams = [support, billing, tier1, tier2, esc]
            for i, agent in enumerate(agents):
                for team in {teams[i % len(teams)], teams[(i + 2) % len(teams)]}:
                    add("team_memberships", "INSERT INTO team_memberships (team_id, agent_id, role) VALUES (%s, %s, %s)",
                        (team, agent, "lead" if i == 0 else "member"))
            for team in teams:
                for name, minutes in (("first_response", 60 * k), ("resolution", 480 * k)):
                    add("sla_policies", "INSERT INTO sla_policies (team_id, name, response_minutes) VALUES (%s, %s, %s)",
                        (team, name, minutes))
            for i, agent in enumerate(agents):
                for j in range(2):
                    add("canned_responses", "INSERT INTO canned_responses (agent_id, title, body) VALUES (%s, %s, %s)",
                        (agent, f"Reply {j}", f"Hello, this is {k}-{i}-{j}. Thanks for waiting."))
            for i in range(10 + 2 * k):
                opened = BASE + timedelta(days=60 * i + k, hours=i)
                ticket = add("tickets", "INSERT INTO tickets (account_id, customer_id, assignee_id, priority_id, subject, "
                             "status, opened_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                             (acc, customers[i % len(customers)], None if i % 3 == 2 else agents[i % len(agents)],
                              prio[PRIORITIES[rnd.randrange(len(PRIORITIES))][0]], f"Printer {k}-{i} is ON FIRE",
                              ("open", "pending", "solved")[i % 3], opened))
                add("attachments", "INSERT INTO attachments (attachable_type, attachable_id, uploader_agent_id, filename, "
                    "byte_size) VALUES ('Ticket', %s, NULL, %s, %s)",  # the customer's screenshot
                    (ticket, f"screenshot-{k}-{i}.png", 1000 + rnd.randrange(50000)))
                for tag in rnd.sample(tags, rnd.randrange(len(tags) + 1)):
                    add("ticket_tags", "INSERT INTO ticket_tags (ticket_id, tag_id) VALUES (%s, %s)", (ticket, tag))
                for e in range(3):  # events in the 2024, 2025 and 2026 partitions
                    add("ticket_events", "INSERT INTO ticket_events (account_id, ticket_id, kind, payload, occurred_at) "
                        "VALUES (%s, %s, %s, %s, %s)",
                        (acc, ticket, ("created", "assigned", "solved")[e], json.dumps({"seq": e, "by": k}),
                         datetime(2024 + e, 1 + i % 12, 1 + k, 12, tzinfo=timezone.utc)))
                for j in range(1 + i % 3):
                    internal = j == 1
                    comment = add("ticket_comments", "INSERT INTO ticket_comments (ticket_id, author_agent_id, body, internal, "
                                  "created_at) VALUES (%s, %s, %s, %s, %s)",
                                  (ticket, None if j == 0 else agents[(i + j) % len(agents)], f"comment {k}-{i}-{j}",
                                   internal, opened + timedelta(minutes=15 * (j + 1))))
                    if j != 2:
                        add("attachments", "INSERT INTO attachments (attachable_type, attachable_id, uploader_agent_id, "
                            "filename, byte_size) VALUES (%s, %s, %s, %s, %s)",
                            ("Helpdesk::InternalNote" if internal else "TicketComment", comment,
                             None if j == 0 else agents[(i + j) % len(agents)], f"log-{k}-{i}-{j}.txt",
                             10 + rnd.randrange(9000)))
                    for emoji in ("thumbsup", "tada")[: (i + j) % 3]:
                        add("comment_reactions", "INSERT INTO comment_reactions (comment_id, emoji) VALUES (%s, %s)",
                            (comment, emoji))
            created[acc] = n
    return created


@pytest.fixture(scope="module")
def helpdesk(devenv, tmp_root):
    uris = {name: _create(devenv, name) for name in CELLS}
    created = _seed(uris["legacy"])
    topo = devenv.topology()
    for acc in ACCOUNTS:
        topo.create_route(acc, "legacy")

    def resolve(name: str) -> Cell:
        if name not in uris:
            raise KeyError(name)
        return Cell(name=name, dsn=uris[name], db_key_base=devenv.resolve_cell(name).db_key_base)

    ctx = MoveContext(tracking=devenv.tracking(), topology=topo, resolve_cell=resolve, dictionary_dir=DOCS,
                      reports_dir=tmp_root / "reports-helpdesk", log=lambda *_: None)
    yield ctx, uris, created
    for name in CELLS:
        with psycopg.connect(devenv.resolve_cell(name).dsn, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


# ------------------------------------------------------------------------------------------ checking
def _normalize(conn, table: str, docs) -> list[str]:
    """Rows as canonical JSON; priority ids (cell-local) replaced by the priority's code."""
    codes = dict(conn.execute("SELECT id, code FROM priorities").fetchall())
    out = []
    for (doc,) in docs:
        r = json.loads(doc)
        if table == "tickets":
            r["priority_id"] = codes[r["priority_id"]]
        if table == "priorities":
            r.pop("id")
        out.append(json.dumps(r, sort_keys=True))
    return sorted(out)


def account_rows(uri: str, table: str, account: int) -> list[str]:
    with psycopg.connect(uri) as c:
        c.execute("SET TimeZone = 'UTC'")
        docs = c.execute(f"SELECT row_to_json(x)::text FROM ({ACCOUNT_ROWS[table]}) x", {"a": account}).fetchall()
        return _normalize(c, table, docs)


def snapshot(uri: str) -> dict[str, list[str]]:
    with psycopg.connect(uri) as c:
        c.execute("SET TimeZone = 'UTC'")
        tables = [r[0] for r in c.execute("SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                                          "AND relkind IN ('r', 'p') AND NOT relispartition ORDER BY 1")]
        return {t: _normalize(c, t, c.execute(f'SELECT row_to_json(x)::text FROM "{t}" x').fetchall()) for t in tables}


# ------------------------------------------------------------------------------------------ tests
def test_plan_classifies_every_table(helpdesk):
    ctx, uris, created = helpdesk
    assert set(EXPECTED) == set(ACCOUNT_ROWS) | {"priorities", "desk_settings", "schema_migrations"}
    with psycopg.connect(uris["legacy"]) as conn:
        catalog = read_catalog(conn)
        plan = Planner(catalog, load_dictionary(DOCS), conn).build(MOVED)
    assert sorted(plan.tables) == sorted(EXPECTED)  # partitions are folded into ticket_events
    assert catalog["ticket_events"].partitioned and len(catalog["ticket_events"].partitions) == 3
    got = {t: (p.strategy, p.inferred) for t, p in plan.tables.items()}
    assert got == EXPECTED
    assert plan.schema_version == "20250612093000"
    how = {t: p.how for t, p in plan.tables.items()}
    assert how["accounts"] == "sharding key id = organization id (root)"
    assert how["customers"] == "inferred: foreign key account_id -> accounts"
    assert how["ticket_comments"] == "inferred: foreign key ticket_id -> tickets"
    assert how["comment_reactions"] == "inferred: foreign key comment_id -> ticket_comments"
    assert how["teams"].startswith("inferred: tree via parent_team_id from roots with account_id -> accounts")
    assert how["team_memberships"] == "inferred: foreign key team_id -> teams"
    assert how["sla_policies"] == "inferred: foreign key team_id -> teams"
    assert how["canned_responses"] == "inferred: foreign key agent_id -> agents"
    # a nullable uploader FK alone would miss the customers' files: the polymorphic owner is OR-ed in
    assert how["attachments"] == ("inferred: any of uploader_agent_id -> agents, polymorphic attachable_type/attachable_id: "
                                  "Helpdesk::InternalNote -> ticket_comments, Ticket -> tickets, "
                                  "TicketComment -> ticket_comments")
    assert "inferred: foreign key" in how["ticket_tags"]
    # keys: composite without id, unique key of a table without primary key, partition column in the key
    assert plan.tables["ticket_tags"].key == ["ticket_id", "tag_id"]
    assert plan.tables["sla_policies"].key == ["team_id", "name"]
    assert plan.tables["ticket_events"].key == ["id", "occurred_at"]
    assert "subject_search" not in plan.tables["tickets"].columns  # generated, never written
    pr = plan.tables["priorities"]
    assert (pr.match_on, pr.insert_missing) == (["code"], False)
    assert [(r.column, r.table, r.match_on) for r in plan.tables["tickets"].remaps] == [("priority_id", "priorities", ["code"])]
    assert any("canned_responses" in w and "not in the table dictionary" in w for w in plan.warnings)
    # every predicate is valid SQL on the source and selects exactly the hand-written rows
    with psycopg.connect(uris["legacy"]) as conn:
        for t, tp in plan.tables.items():
            if tp.strategy == "org":
                n = conn.execute(f"SELECT count(*) FROM \"{t}\" t WHERE {tp.where}").fetchone()[0]
                assert n == created[MOVED][t] == len(account_rows(uris["legacy"], t, MOVED)), t


def test_move_account_to_cell_1(helpdesk, devenv):
    ctx, uris, created = helpdesk
    src_before, dst_before = snapshot(uris["legacy"]), snapshot(uris["cell-1"])
    expected = {t: account_rows(uris["legacy"], t, MOVED) for t in ACCOUNT_ROWS}
    for t, rows in expected.items():
        assert len(rows) == created[MOVED][t] > 0, t
    with psycopg.connect(uris["legacy"]) as c:
        parts = c.execute("SELECT count(DISTINCT tableoid) FROM ticket_events WHERE account_id = %s", (MOVED,)).fetchone()[0]
        assert parts >= 2

    try:
        mid = run_move(ctx, MOVED, "legacy", "cell-1", run_id="second-schema")
    except Exception as e:
        m = ctx.tracking.latest_for_org(MOVED)
        detail = [(t["table_name"], t["source_rows"], t["target_rows"], (t["validation_detail"] or {}).get("diff"))
                  for t in ctx.tracking.tables(m["id"])] if m else []
        pytest.fail(f"move failed: {e}\n" + "\n".join(map(str, detail)))

    m = ctx.tracking.get(mid)
    assert m["state"] == "completed" and m["validation"]["ok"] is True
    route = devenv.topology().route(MOVED)
    assert route["cell"] == "cell-1" and route["maintenance"] is False
    assert all(devenv.topology().route(a)["cell"] == "legacy" for a in ACCOUNTS if a != MOVED)

    src_after, dst_after = snapshot(uris["legacy"]), snapshot(uris["cell-1"])
    assert src_after == src_before, "the source cell changed"
    for t, rows in expected.items():  # every row of the account is on cell-1 exactly as on legacy
        assert account_rows(uris["cell-1"], t, MOVED) == rows, t
    for t in dst_after:  # cell-1 gained exactly the account's rows, nothing else changed
        before, after = dst_before[t], dst_after[t]
        gained = sorted(set(after) - set(before))
        assert set(before) <= set(after) and len(after) == len(before) + len(gained), t
        assert gained == expected.get(t, []), t
    for a in ACCOUNTS:
        if a == MOVED:
            continue
        for t in ACCOUNT_ROWS:  # the other accounts: present on legacy as seeded, absent from cell-1
            assert len(account_rows(uris["legacy"], t, a)) == created[a][t], (a, t)
            assert account_rows(uris["cell-1"], t, a) == [], (a, t)
    with psycopg.connect(uris["cell-1"]) as c:
        # lookups resolved to cell-1's own priority rows (different ids than on legacy)
        assert c.execute("SELECT count(*) FROM tickets t JOIN priorities p ON p.id = t.priority_id "
                         "WHERE t.account_id = %s AND p.id >= %s", (MOVED, gitlab.sequence_range(1)[0])).fetchone()[0] \
            == created[MOVED]["tickets"]
        assert c.execute("SELECT count(DISTINCT tableoid) FROM ticket_events WHERE account_id = %s", (MOVED,)).fetchone()[0] >= 2
        assert c.execute("SELECT count(*) FROM tickets WHERE subject_search <> lower(subject)").fetchone()[0] == 0
        assert [r[0] for r in c.execute("SELECT cell_name FROM desk_settings")] == ["cell-1"]


def test_dry_run_lists_every_table_and_changes_nothing(helpdesk, devenv):
    ctx, uris, created = helpdesk
    before = (snapshot(uris["legacy"]), snapshot(uris["cell-1"]), devenv.topology().route(DRY))
    path, problems = dry_run(ctx, DRY, "legacy", "cell-1")
    assert problems == []
    assert (snapshot(uris["legacy"]), snapshot(uris["cell-1"]), devenv.topology().route(DRY)) == before
    assert ctx.tracking.latest_for_org(DRY) is None
    text = path.read_text()
    assert "Preflight: all checks passed." in text
    lines = text.splitlines()
    for table, (strategy, inferred) in EXPECTED.items():
        row = next((ln for ln in lines if ln.split()[:2] == [table, strategy]), None)
        assert row is not None, f"{table} not listed as {strategy}"
        assert ("[inferred]" in row) == inferred, row
    assert f"Organization rows: {sum(created[DRY].values()):,} in {len(ACCOUNT_ROWS)} tables" in text


def test_preflight_compares_schema_versions_and_requires_lookup_rows(helpdesk):
    ctx, uris, created = helpdesk
    acc = ACCOUNTS[0]
    with psycopg.connect(uris["cell-1"], autocommit=True) as c:
        c.execute("INSERT INTO schema_migrations (version) VALUES ('20250701000000')")
        try:
            problems = run_checks(ctx, acc, "legacy", "cell-1").problems
        finally:
            c.execute("DELETE FROM schema_migrations WHERE version = '20250701000000'")
    assert problems == ["schema versions differ: legacy is at 20250612093000, cell-1 is at 20250701000000; "
                        "migrate both cells to the same version first"]
    with psycopg.connect(uris["legacy"]) as c:
        code = c.execute("SELECT min(p.code) FROM tickets t JOIN priorities p ON p.id = t.priority_id "
                         "WHERE t.account_id = %s", (acc,)).fetchone()[0]
    with psycopg.connect(uris["cell-1"], autocommit=True) as c:
        c.execute("UPDATE priorities SET code = code || '-renamed' WHERE code = %s", (code,))
        try:
            problems = run_checks(ctx, acc, "legacy", "cell-1").problems
        finally:
            c.execute("UPDATE priorities SET code = %s WHERE code = %s", (code, code + "-renamed"))
    assert problems == [f"priorities: code = {code} is used by the organization on the source but has no match on the target cell; add it to the target or configure a mapping"]
    assert run_checks(ctx, acc, "legacy", "cell-1").problems == []

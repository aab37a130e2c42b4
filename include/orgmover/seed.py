"""Deterministic generator of GitLab-shaped organization data for a cell's database.

``seed(dsn, orgs, db_key_base=...)`` fills a cell created by :func:`orgmover.gitlab.install_schema`
with one organization per :class:`OrgSpec`: groups (parent_id trees of depth 2-3), user and project
namespaces, projects with their settings/statistics/features/repositories, routes and redirect
routes, members and project authorizations, milestones, labels, issues, merge requests, notes,
label links, events and push payloads, CI pipelines/builds/artifacts over partitions 100-102,
encrypted CI variables and tokens, snippets, wikis, LFS, uploads, registries, packages, keys,
protected branches, tokens and hooks. ``OrgSpec.rows`` is the approximate number of org-owned rows.

Cross-organization references are created on purpose, because they are what makes moving an
organization hard:

* a pool of users shared by the orgs: every user has a *home* org (which holds the user's personal
  namespace), some are also members of other orgs;
* ``lfs_objects`` is cell-local (one row per oid): some oids are linked from projects of several orgs;
* for every pair of consecutive orgs (A = orgs[i], B = orgs[i+1]) one project of B is a fork of a
  project of A and both use the same ``pool_repositories`` row (source project in A).

Everything is deterministic for a given ``seed`` on a fresh cell: random values come from
``random.Random`` (one per org, derived from the seed and the org path), timestamps are fixed bases
plus random offsets, encryption IVs come from the same random generators, and ids are reserved
from the cell's own sequences (so they are in the cell's range and identical on a fresh cell).

Rows are written with ``COPY ... FROM STDIN`` in one transaction per organization (users and the
shared LFS objects in a first transaction), with normal foreign-key enforcement.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Callable, Iterable

import psycopg
from psycopg.types.json import Jsonb

from orgmover import secrets
from orgmover.errors import ConfigError

__all__ = ["OrgSpec", "SeededOrg", "seed", "default_orgs", "org_path", "ORG_TABLES"]

BASE = datetime(2025, 1, 1, tzinfo=timezone.utc)
YEAR = 365 * 86400
DAY = 86400

# Tables whose rows belong to one organization (what ``SeededOrg.rows`` counts).
ORG_TABLES = (
    "organizations", "organization_users", "namespaces", "namespace_settings", "projects",
    "project_settings", "project_statistics", "project_features", "project_repositories", "routes",
    "redirect_routes", "members", "project_authorizations", "milestones", "labels", "issues",
    "merge_requests", "notes", "label_links", "events", "push_event_payloads", "p_ci_pipelines",
    "p_ci_builds", "p_ci_job_artifacts", "ci_variables", "ci_group_variables", "snippets",
    "snippet_repositories", "group_wiki_repositories", "lfs_objects_projects", "uploads",
    "container_repositories", "packages_packages", "packages_package_files", "keys",
    "deploy_keys_projects", "deploy_tokens", "protected_branches", "personal_access_tokens", "web_hooks",
)
# Cell-local / cluster-wide rows the seed also creates (not owned by one org).
SHARED_TABLES = ("users", "lfs_objects", "pool_repositories")

# Share of the "content" budget (what is left after the org's structure) per table.
_CONTENT_WEIGHTS = {
    "issues": 0.085,
    "merge_requests": 0.04,
    "notes": 0.22,
    "label_links": 0.10,
    "events": 0.08,  # non-push events; push events are counted with push_event_payloads
    "push_event_payloads": 0.10,  # one push event + one payload each
    "p_ci_pipelines": 0.035,
    "p_ci_builds": 0.13,
    "p_ci_job_artifacts": 0.07,
    "uploads": 0.02,
    "lfs_objects_projects": 0.02,
    "packages_packages": 0.008,
    "packages_package_files": 0.016,
    "snippets": 0.004,  # + one snippet_repositories row each
    "container_repositories": 0.004,
}

# --------------------------------------------------------------------------------------------
# public API


@dataclass
class OrgSpec:
    name: str  # e.g. "acme"; path derived from it
    rows: int  # approximate total number of rows this org should own across all tables

    @property
    def path(self) -> str:
        return org_path(self.name)


@dataclass
class SeededOrg:
    id: int
    path: str
    rows: dict[str, int]  # rows per table created for this org (org-owned rows only)
    shared_rows: dict[str, int] = field(default_factory=dict)  # cell-local rows created with it (lfs_objects, pool_repositories)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def org_path(name: str) -> str:
    s = _ascii_slug(name)
    if not s:
        raise ConfigError(f"organization name {name!r} gives an empty path")
    return s


def default_orgs(large_rows: int = 120_000) -> list[OrgSpec]:
    """The demo's organizations: tiny, small, medium, one large and another small one."""
    return [
        OrgSpec("Tiny Toys", 300),
        OrgSpec("Acme Corp", 3_000),
        OrgSpec("Globex", 20_000),
        OrgSpec("Initech", large_rows),
        OrgSpec("Umbrella Labs", 3_000),
    ]


def seed(dsn: str, orgs: list[OrgSpec], *, db_key_base: str, seed: int = 42,
         log: Callable[[str], None] = print) -> list[SeededOrg]:
    """Seed ``orgs`` into the cell database at ``dsn``; returns what was created per org."""
    if not orgs:
        return []
    paths = [o.path for o in orgs]
    dup = sorted({p for p in paths if paths.count(p) > 1})
    if dup:
        raise ConfigError(f"organization paths must be unique, got duplicates {dup}; nothing was seeded")
    for o in orgs:
        if o.rows < 1:
            raise ConfigError(f"organization {o.name!r}: rows must be positive; nothing was seeded")
    key = secrets.key_from_db_key_base(db_key_base)
    with psycopg.connect(dsn) as conn:
        existing = conn.execute("SELECT path FROM organizations WHERE path = ANY(%s)", (paths,)).fetchall()
        if existing:
            raise ConfigError(f"organizations already exist in this cell: {[r[0] for r in existing]}; nothing was seeded")
        db = _Db(conn)
        top = random.Random(seed)
        plans = [_plan(o, n_orgs=len(orgs)) for o in orgs]
        pool = _seed_users(db, top, plans, key, seed)
        shared_lfs = _seed_shared_lfs(db, seed)
        conn.commit()
        out: list[SeededOrg] = []
        fork_source: _ForkSource | None = None
        for i, (spec, plan) in enumerate(zip(orgs, plans)):
            t0 = time.monotonic()
            s = _OrgSeeder(db, spec, plan, i, len(orgs), pool, shared_lfs, key, seed,
                           fork_from=fork_source, make_fork_source=i + 1 < len(orgs))
            s.run()
            conn.commit()
            fork_source = s.fork_out
            secs = time.monotonic() - t0
            rows = {t: s.counts[t] for t in ORG_TABLES if s.counts[t]}
            shared = {t: s.counts[t] for t in SHARED_TABLES if s.counts[t]}
            so = SeededOrg(id=s.org_id, path=spec.path, rows=rows, shared_rows=shared, seconds=round(secs, 3))
            out.append(so)
            log(f"seeded org {spec.path!r} (id {s.org_id}): {so.total} rows "
                f"(target {spec.rows}) in {len(rows)} tables in {secs:.1f}s")
        return out


# --------------------------------------------------------------------------------------------
# vocabulary (including awkward values: quotes, backslashes, tabs, newlines, unicode, COPY escapes)

_AWKWARD = [
    'Handle "quoted" paths',
    "It's broken on C:\\Users\\dev\\repo",
    "tabs\tinside\tand\nnewlines\r\nand CRLF",
    "Ünïcödé — naïve café, 日本語, 中文, العربية, עברית 🚀🔥",
    "backslash at the end \\",
    "literal \\N and \\. and \\\\N are not special",
    "ZWJ 👩‍💻 and a combining e\u0301 and \u200b zero width",
    "SQL '); DROP TABLE notes; --",
    "percent %s %(x)s {braces} $1 ? :name",
    "<script>alert('x')</script> &amp; &",
    "",
    "  leading and trailing spaces  ",
    "😀😃😄",
    "line1\n\nline3\n",
    "pipe|comma,semicolon;quote'dquote\"",
    "NULL",
    "\\x00 is not a NUL byte",
]
_VERBS = ["Fix", "Add", "Remove", "Refactor", "Improve", "Update", "Investigate", "Document", "Speed up", "Revert"]
_NOUNS = ["login page", "CI pipeline", "merge widget", "API pagination", "search index", "rate limiter",
          "cache layer", "billing export", "webhook retries", "Gitaly client", "dark mode", "2FA flow",
          "package registry", "LFS upload", "runner tokens", "audit log", "i18n strings", "release notes"]
_DESCRIPTIONS = [
    "## Steps to reproduce\n\n1. Run `make test`\n2. See the error:\n\n```\nTraceback (most recent call last):\n  File \"x.py\", line 1\n\tKeyError: 'ü'\n```\n",
    "Customer report:\n> \"It doesn't work\" — said O'Brien\n\nPath: `C:\\Program Files\\GitLab\\`\n",
    "Checklist:\n- [x] done\n- [ ] todo\t(tab)\n- [ ] 日本語のテキスト\n",
    "Plain one-line description.",
    "Trailing backslash \\\nand a line with only \\N\n",
    "Emoji heavy 🎉🎉🎉 ✓ ✗ → ← ∞ ≠ ∑",
    "",
    ("Long description. " * 400) + "END",  # > 2 kB: toasted
]
_NOTES = [
    "LGTM 👍", "Can you add a test?", "I disagree:\n\n> quoted text\n\nbecause \"reasons\".",
    "See `path\\to\\file` line 42", "Thanks!\t🙏", "Merged in 1a2b3c4d", "/label ~bug ~\"needs review\"",
    "Ping @someone — any update?", "Ça marche pas sur Windows\r\n", "+1", "This breaks `COPY` with \\N",
]
_SYSTEM_NOTES = ["changed milestone to %v1.0", "added ~bug label", "closed", "reopened",
                 "mentioned in merge request !1", "changed the description", "assigned to @user"]
_GROUP_WORDS = ["platform", "backend", "frontend", "infra", "data", "mobile", "security", "tools", "docs", "ml",
                "payments", "search", "ops", "qa", "design", "research", "growth", "core"]
_GROUP_NAMES = {"security": "Security & Compliance", "research": "R&D \"Labs\"", "data": "Data (Ünïcode)",
                "ml": "ML / AI"}
_PROJECT_WORDS = ["api", "web", "worker", "cli", "sdk", "docs", "infra", "charts", "gateway", "auth", "billing",
                  "scheduler", "mailer", "search", "analytics", "mobile-app", "website", "terraform", "runner",
                  "exporter", "proxy", "ui-kit", "notifier", "importer"]
_FIRST = ["Ada", "Linus", "Grace", "Zoë", "José", "Siobhán", "Ming", "Priya", "Björk", "Renée", "Łukasz", "Ωmar",
          "Noah", "Emma", "Olivia", "Liam", "Mia", "Yuki", "Aarav", "Fatima", "Sven", "Chloé", "Mateus", "Ivan"]
_LAST = ["Lovelace", "Torvalds", "Hopper", "O'Brien", "Núñez", "Müller", "Dubois", "Smith", "Nakamura", "Kowalski",
         "Ng", "Garcia", "Rossi", "Johansson", "Ivanov", "Patel", "Kim", "D'Angelo", "van der Berg", "Øvergård"]
_LABELS = ["bug", "feature", "priority::high", "priority::low", "needs \"review\"", "🚀 release", "docs",
           "backend", "frontend", "tech-debt", "security", "good first issue", "workflow::in dev", "régression"]
_MILESTONES = ["v1.0", "v1.1", "v2.0-beta", "Q1 2025", "Sprint 7", "Backlog", "Release «Ünïcode»"]
_CI_KEYS = ["DATABASE_URL", "API_TOKEN", "AWS_SECRET_ACCESS_KEY", "SSH_PRIVATE_KEY", "DEPLOY_ENV", "NPM_TOKEN",
            "DOCKER_AUTH_CONFIG", "SENTRY_DSN"]
_CI_SCOPES = ["*", "*", "*", "production", "staging/*", "review/*"]
_CI_VALUES = [
    "postgres://app:p@ss'w\"ord@db:5432/app?sslmode=require",
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\n-----END OPENSSH PRIVATE KEY-----\n",
    "ünïcödé-sëcret-🔑",
    "back\\slash\ttab",
    '{"auths": {"registry.example.com": {"auth": "dXNlcjpwYXNz"}}}',
    "",
]
_JOB_NAMES = [("build", "build"), ("compile", "build"), ("rspec 1/3", "test"), ("rspec 2/3", "test"),
              ("rspec 3/3", "test"), ("lint", "test"), ("jest", "test"), ("deploy:staging", "deploy"),
              ("deploy:production", "deploy"), ("pages", "deploy")]
_BUILD_OPTIONS = [
    Jsonb({"script": ["bundle exec rspec", "echo \"done\""], "image": {"name": "ruby:3.3"}}),
    Jsonb({"script": ["make test\tall", "printf 'a\\nb'"], "artifacts": {"paths": ["coverage/"], "expire_in": "1 week"}}),
    Jsonb({"script": ["echo ünïcödé 🚀"], "variables": {"QUOTE": "\"", "BACKSLASH": "\\", "EMPTY": ""},
           "retry": {"max": 2, "when": ["runner_system_failure"]}}),
    Jsonb({"script": [], "needs": [], "allow_failure": True, "timeout": 3600.5, "tags": None}),
    Jsonb({"environment": {"name": "production", "url": "https://example.com/?a=1&b=2"},
           "rules": [{"if": "$CI_COMMIT_BRANCH == \"main\""}]}),
    Jsonb([1, "two", {"three": [3.0, None, False]}]),
]
_STATUSES = ["success", "success", "success", "success", "failed", "canceled", "running", "pending", "skipped", "manual"]
_UPLOAD_NAMES = ["screenshot (1).png", "résumé.pdf", "日本語.txt", "log with spaces.log", "diagram.svg",
                 "o'brien \"final\".docx", "archive.tar.gz"]
_PKG_NAMES = ["@acme/utils", "my_pkg", "com.example:core", "ünïcode-lib", "left-pad", "tools/cli"]
_HOOK_URLS = ["https://hooks.example.com/gitlab?token=a%20b&x=1", "http://10.0.0.1:8080/hook",
              "https://ci.example.org/project/ünïcode", "https://example.com/path/with\\backslash"]
_SCOPES = ["api", "read_api", "read_user", "read_repository", "write_repository", "read_registry", "write_registry"]


def _ascii_slug(s: str) -> str:
    s = unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")


def _hashed(prefix: str, container_id: int) -> str:
    h = hashlib.sha256(str(container_id).encode()).hexdigest()
    return f"{prefix}/{h[0:2]}/{h[2:4]}/{h}"


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder, deterministic)."""
    s = float(sum(weights))
    if total <= 0 or s <= 0:
        return [0] * len(weights)
    raw = [total * w / s for w in weights]
    out = [int(x) for x in raw]
    rem = total - sum(out)
    order = sorted(range(len(weights)), key=lambda i: (out[i] - raw[i], i))
    for i in order[:rem]:
        out[i] += 1
    return out


# --------------------------------------------------------------------------------------------
# database helpers


class _Db:
    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self.cur = conn.cursor()
        self._seqs: dict[str, str] = {}
        self.shards = dict(conn.execute("SELECT name, id FROM shards ORDER BY id").fetchall())
        if not self.shards:
            raise ConfigError("the cell has no shards rows; run install_schema first")
        self.shard_names = [n for n in ("default", "storage-2") if n in self.shards] or sorted(self.shards)

    def reserve(self, table: str, n: int) -> list[int]:
        """Take ``n`` ids from ``table``'s own sequence (the cell's range)."""
        if n <= 0:
            return []
        seq = self._seqs.get(table)
        if seq is None:
            seq = self.conn.execute("SELECT pg_get_serial_sequence(%s, 'id')", (table,)).fetchone()[0]
            self._seqs[table] = seq
        rows = self.conn.execute("SELECT nextval(%s::regclass) FROM generate_series(1, %s)", (seq, n)).fetchall()
        return sorted(r[0] for r in rows)

    def copy(self, table: str, cols: tuple[str, ...], rows: Iterable[tuple], counts: Counter | None = None) -> int:
        n = 0
        with self.cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as cp:
            for r in rows:
                cp.write_row(r)
                n += 1
        if counts is not None:
            counts[table] += n
        return n


def _enc(key: bytes, rng: random.Random, plaintext: str) -> tuple[str, str]:
    """Separate-IV layout (value, iv); the IV comes from ``rng`` so the seed is deterministic."""
    return secrets.encrypt(key, plaintext.encode(), iv=rng.randbytes(secrets.IV_BYTES))


def _enc_embedded(key: bytes, rng: random.Random, plaintext: str) -> str:
    """Embedded-IV layout, identical to ``secrets.encrypt_embedded`` but with an IV from ``rng``."""
    ct, iv = _enc(key, rng, plaintext)
    return base64.b64encode(base64.b64decode(iv) + base64.b64decode(ct)).decode()


def _ts(rng: random.Random, lo: int = 0, hi: int = YEAR) -> datetime:
    """A fixed base plus a random offset (seconds in [lo, hi)), sometimes with microseconds."""
    us = rng.randrange(1_000_000) if rng.random() < 0.5 else 0
    return BASE + timedelta(seconds=rng.randrange(lo, hi), microseconds=us)


# --------------------------------------------------------------------------------------------
# planning


@dataclass
class _Plan:
    spec: OrgSpec
    n_projects: int
    n_groups: int
    n_roots: int
    n_home_users: int
    n_guests: int
    home_users: list[int] = field(default_factory=list)
    guests: list[int] = field(default_factory=list)


def _plan(spec: OrgSpec, n_orgs: int) -> _Plan:
    r = spec.rows
    g = min(60, max(2, round(math.sqrt(r) / 25)))
    u = min(1500, max(3, round(r / 400)))
    return _Plan(spec=spec, n_projects=max(2, round(r / 700)), n_groups=g, n_roots=min(g - 1, 1 + g // 8),
                 n_home_users=u, n_guests=(max(1, u // 10) if n_orgs > 1 else 0))


@dataclass
class _User:
    id: int
    username: str
    name: str
    home: int  # index of the home org


def _seed_users(db: _Db, rng: random.Random, plans: list[_Plan], key: bytes, seed_: int) -> dict[int, _User]:
    """The pool of users shared by the orgs (cluster-wide table); picks each org's home users and guests."""
    total = sum(p.n_home_users for p in plans)
    ids = db.reserve("users", total)
    users: dict[int, _User] = {}
    rows = []
    k = 0
    for oi, p in enumerate(plans):
        for _ in range(p.n_home_users):
            uid = ids[k]
            k += 1
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            username = f"{_ascii_slug(first) or 'user'}.{_ascii_slug(last) or 'user'}{uid}"
            name = f"{first} {last}"
            users[uid] = _User(uid, username, name, oi)
            p.home_users.append(uid)
            otp, otp_iv = (_enc(key, rng, base64.b32encode(rng.randbytes(20)).decode())
                           if rng.random() < 0.25 else (None, None))
            created = _ts(rng, -2 * YEAR, 0)
            rows.append((uid, username, f"{username}@example.com", name if rng.random() < 0.95 else None,
                         "blocked" if rng.random() < 0.03 else "active", k == 1, otp, otp_iv,
                         created, created + timedelta(days=rng.randrange(300))))
    db.copy("users", ("id", "username", "email", "name", "state", "admin", "encrypted_otp_secret",
                      "encrypted_otp_secret_iv", "created_at", "updated_at"), rows)
    # guests: members of an org whose home is another org
    for oi, p in enumerate(plans):
        others = [u for oj, q in enumerate(plans) if oj != oi for u in q.home_users]
        p.guests = sorted(rng.sample(others, min(p.n_guests, len(others))))
    return users


def _shared_oid(seed_: int, k: int) -> str:
    return hashlib.sha256(f"shared-lfs:{seed_}:{k}".encode()).hexdigest()


def _seed_shared_lfs(db: _Db, seed_: int, n: int = 4) -> list[int]:
    """LFS objects every org links (cell-local, one row per oid): same content in several orgs."""
    ids = []
    for k in range(n):
        oid = _shared_oid(seed_, k)
        size = 1024 * (k + 1) ** 3
        row = db.conn.execute(
            "INSERT INTO lfs_objects (oid, size, file, file_store, created_at) VALUES (%s, %s, %s, 1, %s) "
            "ON CONFLICT (oid) DO NOTHING RETURNING id",
            (oid, size, f"{oid[0:2]}/{oid[2:4]}/{oid[4:]}", BASE - timedelta(days=400 - k))).fetchone()
        if row is None:
            row = db.conn.execute("SELECT id FROM lfs_objects WHERE oid = %s", (oid,)).fetchone()
        ids.append(row[0])
    return ids


@dataclass
class _ForkSource:
    project_id: int
    pool_id: int
    shard: str
    path: str
    lfs_object_ids: list[int]


@dataclass
class _Group:
    idx: int
    id: int
    parent: int | None  # index
    depth: int
    path: str
    full_path: str
    name: str
    full_name: str
    traversal: list[int]
    members: dict[int, int] = field(default_factory=dict)  # direct: user -> access level
    effective: dict[int, int] = field(default_factory=dict)
    milestones: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


@dataclass
class _Project:
    idx: int
    id: int
    ns_id: int  # project namespace
    parent_ns_id: int
    parent_full_path: str
    parent_full_name: str
    parent_traversal: list[int]
    group: int | None  # group index, None for personal projects
    owner: int | None  # user for personal projects
    path: str
    name: str
    shard: str
    weight: float
    forked_from: int | None = None
    pool_id: int | None = None
    lfs: bool = False
    auth: dict[int, int] = field(default_factory=dict)
    auth_users: list[int] = field(default_factory=list)
    milestones: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    issues: list[int] = field(default_factory=list)
    mrs: list[int] = field(default_factory=list)
    notes: list[int] = field(default_factory=list)
    lfs_objects: list[int] = field(default_factory=list)
    avail_labels: list[int] = field(default_factory=list)  # own + ancestor groups'
    avail_milestones: list[int] = field(default_factory=list)

    @property
    def full_path(self) -> str:
        return f"{self.parent_full_path}/{self.path}"


# --------------------------------------------------------------------------------------------
# one organization


class _OrgSeeder:
    def __init__(self, db: _Db, spec: OrgSpec, plan: _Plan, index: int, n_orgs: int, users: dict[int, _User],
                 shared_lfs: list[int], key: bytes, seed_: int, *, fork_from: _ForkSource | None,
                 make_fork_source: bool):
        self.db, self.spec, self.plan, self.index, self.users = db, spec, plan, index, users
        self.shared_lfs, self.key, self.seed = shared_lfs, key, seed_
        self.fork_from, self.make_fork_source = fork_from, make_fork_source
        self.rng = random.Random(f"{seed_}/{index}/{spec.path}")
        self.counts: Counter = Counter()
        self.fork_out: _ForkSource | None = None
        self.path = spec.path
        # org-relative time window: org i was created a bit after org i-1
        self.t0 = 7 * DAY * index

    # helpers ---------------------------------------------------------------------------------
    def ts(self, lo: int = 0, hi: int = YEAR) -> datetime:
        return _ts(self.rng, self.t0 + lo, self.t0 + hi)

    def copy(self, table: str, cols: tuple[str, ...], rows: Iterable[tuple]) -> int:
        return self.db.copy(table, cols, rows, self.counts)

    def text(self, p_awkward: float = 0.15) -> str:
        r = self.rng
        t = f"{r.choice(_VERBS)} {r.choice(_NOUNS)}"
        if r.random() < p_awkward:
            t = f"{t} {r.choice(_AWKWARD)}"
        return t

    def maybe(self, value, p_null: float = 0.2):
        return None if self.rng.random() < p_null else value

    def sha(self) -> str:
        return f"{self.rng.getrandbits(160):040x}"

    def sha256(self) -> str:
        return f"{self.rng.getrandbits(256):064x}"

    # main ------------------------------------------------------------------------------------
    def run(self) -> None:
        self.structure()
        self.content()

    # structure: org, users, namespaces, projects, routes, members, labels, settings, tokens ---
    def structure(self) -> None:
        db, rng, p = self.db, self.rng, self.plan
        self.org_id = org_id = db.reserve("organizations", 1)[0]
        created = self.ts(-YEAR // 2, -YEAR // 4)
        self.copy("organizations", ("id", "name", "path", "visibility_level", "created_at", "updated_at"),
                  [(org_id, self.spec.name, self.path, rng.choice([0, 10, 20]), created, created + timedelta(days=3))])
        self.home = list(p.home_users)
        self.ousers = sorted(set(p.home_users) | set(p.guests))
        owner = self.home[0]
        self.copy("organization_users", ("id", "organization_id", "user_id", "access_level"),
                  [(oid, org_id, uid, 50 if uid == owner else rng.choice([10, 10, 10, 30]))
                   for oid, uid in zip(db.reserve("organization_users", len(self.ousers)), self.ousers)])

        # plan groups and projects ---------------------------------------------------------
        n_g = p.n_groups
        n_personal = p.n_projects // 10 if p.n_projects >= 4 else 0
        n_group_projects = p.n_projects - n_personal
        extra_fork = 1 if self.fork_from else 0
        n_p = p.n_projects + extra_fork
        ns_ids = db.reserve("namespaces", n_g + len(self.home) + n_p)
        gids, uns_ids, pns_ids = ns_ids[:n_g], ns_ids[n_g:n_g + len(self.home)], ns_ids[n_g + len(self.home):]
        self.user_ns = dict(zip(self.home, uns_ids))

        groups: list[_Group] = []
        used_paths: set[str] = set()
        for gi in range(n_g):
            if gi < p.n_roots:
                parent = None
            elif gi == p.n_roots:
                parent = 0  # depth 2
            elif gi == p.n_roots + 1:
                parent = p.n_roots  # depth 3
            else:
                parent = rng.choice([g.idx for g in groups if g.depth < 3])
            word = rng.choice(_GROUP_WORDS)
            if parent is None:
                seg = self.path if gi == 0 else f"{self.path}-{word}"
                full = seg
                name = self.spec.name if gi == 0 else f"{self.spec.name} {_GROUP_NAMES.get(word, word.title())}"
                full_name, depth, trav = name, 1, []
            else:
                pg = groups[parent]
                seg, full = word, f"{pg.full_path}/{word}"
                name = _GROUP_NAMES.get(word, word.title())
                full_name, depth, trav = f"{pg.full_name} / {name}", pg.depth + 1, pg.traversal
            k = 2
            base_seg, base_full = seg, full
            while full in used_paths:
                seg, full = f"{base_seg}-{k}", f"{base_full}-{k}"
                k += 1
            used_paths.add(full)
            if parent is not None and seg != base_seg:
                name = f"{name} {k - 1}"
                full_name = f"{groups[parent].full_name} / {name}"
            groups.append(_Group(gi, gids[gi], parent, depth, seg, full, name, full_name, trav + [gids[gi]]))
        self.groups = groups

        pids = db.reserve("projects", n_p)
        projects: list[_Project] = []
        proj_paths = used_paths  # groups and projects share the route namespace
        for pi in range(n_p):
            personal = n_group_projects <= pi < p.n_projects
            is_cross_fork = pi == p.n_projects
            if personal:
                owner_uid = self.home[(pi - n_group_projects) % len(self.home)]
                uname = self.users[owner_uid].username
                parent_ns, parent_full, parent_name = self.user_ns[owner_uid], uname, self.users[owner_uid].name
                parent_trav, gidx = [self.user_ns[owner_uid]], None
            else:
                owner_uid = None
                g = groups[0] if is_cross_fork else groups[rng.randrange(n_g)]
                parent_ns, parent_full, parent_name, parent_trav, gidx = g.id, g.full_path, g.full_name, g.traversal, g.idx
            word = rng.choice(_PROJECT_WORDS)
            if is_cross_fork:
                word = f"{self.fork_from.path}-fork"
            path, k = word, 2
            while f"{parent_full}/{path}" in proj_paths:
                path, k = f"{word}-{k}", k + 1
            proj_paths.add(f"{parent_full}/{path}")
            name = path.replace("-", " ").title() if rng.random() < 0.8 else f"{path} {rng.choice(_AWKWARD)}"
            shard = rng.choice(db.shard_names)
            weight = min(rng.paretovariate(1.16), 40.0)
            pr = _Project(pi, pids[pi], pns_ids[pi], parent_ns, parent_full, parent_name, parent_trav, gidx,
                          owner_uid, path, name, shard, weight)
            if is_cross_fork:
                pr.forked_from, pr.pool_id, pr.shard = self.fork_from.project_id, self.fork_from.pool_id, self.fork_from.shard
                pr.weight = 0.5
            projects.append(pr)
        self.projects = projects
        group_projects = [pr for pr in projects if pr.group is not None and pr.forked_from is None]
        # pools created in this org: the fork source for the next org, and one intra-org fork
        pools: list[tuple[_Project, list[_Project]]] = []  # (source, forks in this org)
        if self.make_fork_source:
            pools.append((group_projects[0], []))
        if len(group_projects) >= 6:
            src, fork = group_projects[1], group_projects[-1]
            fork.forked_from, fork.shard = src.id, src.shard
            pools.append((src, [fork]))
        for pr in projects:
            pr.lfs = rng.random() < 0.3
        for src, _ in pools:
            src.lfs = True
        projects[0].lfs = True  # links the shared LFS objects

        # namespaces ---------------------------------------------------------------------
        ns_rows = []
        settings_rows = []
        for g in groups:
            gc = self.ts(-YEAR // 4, 0)
            ns_rows.append((g.id, org_id, g.name, g.path, "Group", groups[g.parent].id if g.parent is not None else None,
                            None, g.traversal, rng.choice([0, 10, 20]), self.maybe(self.text(0.5), 0.4),
                            _enc_embedded(self.key, rng, f"GR1348941{rng.getrandbits(100):x}"), gc, gc + timedelta(days=1)))
            settings_rows.append((g.id, self.maybe("main", 0.3), rng.random() < 0.2, Jsonb(self.settings_json(g.id))))
        for uid in self.home:
            u = self.users[uid]
            uc = self.ts(-YEAR, -YEAR // 2)
            ns_rows.append((self.user_ns[uid], org_id, u.name, u.username, "User", None, uid, [self.user_ns[uid]],
                            0, None, None, uc, uc))
            settings_rows.append((self.user_ns[uid], None, False, Jsonb({})))
        for pr in projects:
            pc = self.ts(-YEAR // 8, 0)
            ns_rows.append((pr.ns_id, org_id, pr.name, pr.path, "Project", pr.parent_ns_id, pr.owner,
                            pr.parent_traversal + [pr.ns_id], rng.choice([0, 10, 20]), None, None, pc, pc))
        self.copy("namespaces", ("id", "organization_id", "name", "path", "type", "parent_id", "owner_id", "traversal_ids",
                                 "visibility_level", "description", "runners_token_encrypted", "created_at", "updated_at"),
                  ns_rows)
        self.copy("namespace_settings", ("namespace_id", "default_branch_name", "prevent_forking_outside_group", "settings"),
                  settings_rows)

        # members and authorizations ------------------------------------------------------
        levels = [10, 20, 30, 30, 30, 40, 40, 50]
        n_root_members = min(len(self.ousers), 3 + round(2 * math.sqrt(len(self.ousers))))
        for g in groups:
            if g.parent is None:
                chosen = rng.sample(self.ousers, n_root_members)
                g.members = {u: rng.choice(levels) for u in chosen}
                if g.idx == 0:
                    g.members[owner] = 50
                    for guest in p.guests[:1]:  # at least one guest is a member of this org's main group
                        g.members.setdefault(guest, 30)
            else:
                g.members = {u: rng.choice(levels) for u in rng.sample(self.ousers, min(len(self.ousers), rng.randint(1, 3)))}
            g.effective = dict(groups[g.parent].effective) if g.parent is not None else {}
            for u, lvl in g.members.items():
                g.effective[u] = max(lvl, g.effective.get(u, 0))
        member_rows = []
        for g in groups:
            for u, lvl in sorted(g.members.items()):
                member_rows.append([g.id, "Namespace", g.id, u, lvl, "GroupMember", self.maybe(date(2026, 1, 1) + timedelta(days=rng.randrange(365)), 0.9), self.ts(-YEAR // 4, 0)])
        # one pending invitation (no user yet) in the main group
        member_rows.append([groups[0].id, "Namespace", groups[0].id, None, 30, "GroupMember", None, self.ts(-30 * DAY, 0)])
        for pr in projects:
            direct: dict[int, int] = {}
            if pr.owner is not None:
                direct[pr.owner] = 50
            for u in rng.sample(self.ousers, min(len(self.ousers), rng.randint(0, 2))):
                direct.setdefault(u, rng.choice(levels[:-1]))
            for u, lvl in sorted(direct.items()):
                member_rows.append([pr.id, "Project", pr.ns_id, u, lvl, "ProjectMember", None, self.ts(-YEAR // 8, 0)])
            auth = dict(groups[pr.group].effective) if pr.group is not None else {}
            for u, lvl in direct.items():
                auth[u] = max(lvl, auth.get(u, 0))
            pr.auth = auth
            pr.auth_users = sorted(auth)
        mids = db.reserve("members", len(member_rows))
        self.member_rows = [tuple([mid] + r) for mid, r in zip(mids, member_rows)]

        # write projects (pool ids of pools created here are set after the pools exist)
        self.copy("projects", ("id", "organization_id", "namespace_id", "project_namespace_id", "creator_id", "name", "path",
                               "description", "visibility_level", "archived", "repository_storage", "pool_repository_id",
                               "forked_from_project_id", "runners_token_encrypted", "star_count", "last_activity_at",
                               "created_at", "updated_at"),
                  [(pr.id, org_id, pr.parent_ns_id, pr.ns_id, pr.owner or rng.choice(pr.auth_users), pr.name, pr.path,
                    self.maybe(rng.choice(_DESCRIPTIONS), 0.3), rng.choice([0, 10, 20]), rng.random() < 0.05, pr.shard,
                    pr.pool_id, pr.forked_from,
                    self.maybe(_enc_embedded(self.key, rng, f"GR1348941{rng.getrandbits(100):x}"), 0.1),
                    rng.choice([0, 0, 0, 1, 2, 5, 42]), self.maybe(self.ts(0, YEAR), 0.1),
                    self.ts(-YEAR // 8, 0), self.ts(0, 30 * DAY)) for pr in projects])
        if pools:
            pool_ids = db.reserve("pool_repositories", len(pools))
            self.copy("pool_repositories", ("id", "shard_id", "disk_path", "state", "source_project_id"),
                      [(pid, db.shards[src.shard], _hashed("@pools", pid), "ready", src.id)
                       for pid, (src, _) in zip(pool_ids, pools)])
            updates = []
            for pid, (src, forks) in zip(pool_ids, pools):
                for pr in [src] + forks:
                    pr.pool_id = pid
                    updates.append((pid, pr.id))
            db.cur.executemany("UPDATE projects SET pool_repository_id = %s WHERE id = %s", updates)
        else:
            pool_ids = []
        self.pools, self.pool_ids = pools, pool_ids

        self.copy("project_settings", ("project_id", "show_default_award_emojis", "squash_option", "cve_id_request_enabled",
                                       "created_at", "updated_at"),
                  [(pr.id, rng.random() < 0.9, self.maybe(rng.choice([0, 1, 2, 3]), 0.2), rng.random() < 0.5,
                    BASE, BASE + timedelta(days=rng.randrange(100))) for pr in projects])
        self.copy("project_statistics", ("id", "project_id", "namespace_id", "commit_count", "storage_size",
                                         "repository_size", "lfs_objects_size", "build_artifacts_size", "packages_size"),
                  [(sid, pr.id, pr.parent_ns_id, rng.randrange(5000), rng.randrange(10**10), rng.randrange(10**9),
                    rng.randrange(10**8) if pr.lfs else 0, rng.randrange(10**9), rng.randrange(10**7))
                   for sid, pr in zip(db.reserve("project_statistics", len(projects)), projects)])
        self.copy("project_features", ("id", "project_id", "issues_access_level", "merge_requests_access_level",
                                       "wiki_access_level", "builds_access_level"),
                  [(fid, pr.id, rng.choice([0, 10, 20]), rng.choice([0, 10, 20]), rng.choice([0, 10, 20]), 20)
                   for fid, pr in zip(db.reserve("project_features", len(projects)), projects)])
        self.copy("project_repositories", ("id", "project_id", "shard_id", "disk_path", "object_format"),
                  [(rid, pr.id, db.shards[pr.shard], _hashed("@hashed", pr.id), 1 if rng.random() < 0.05 else 0)
                   for rid, pr in zip(db.reserve("project_repositories", len(projects)), projects)])

        # routes and redirect routes ------------------------------------------------------
        route_rows = []
        for g in groups:
            route_rows.append(("Namespace", g.id, g.full_path, g.full_name, g.id))
        for uid in self.home:
            route_rows.append(("Namespace", self.user_ns[uid], self.users[uid].username, self.users[uid].name, self.user_ns[uid]))
        for pr in projects:
            route_rows.append(("Project", pr.id, pr.full_path, f"{pr.parent_full_name} / {pr.name}", pr.ns_id))
        self.copy("routes", ("id", "source_type", "source_id", "path", "name", "namespace_id", "created_at"),
                  [(rid, *r, self.ts(-YEAR // 8, 0)) for rid, r in zip(db.reserve("routes", len(route_rows)), route_rows)])
        redirects = [("Namespace", g.id, f"{g.full_path}-old{g.id}") for g in groups if rng.random() < 0.25]
        redirects += [("Project", pr.id, f"{pr.parent_full_path}/{pr.path}-old{pr.id}") for pr in projects if rng.random() < 0.15]
        if not redirects:
            redirects.append(("Project", projects[0].id, f"{projects[0].parent_full_path}/{projects[0].path}-old{projects[0].id}"))
        self.copy("redirect_routes", ("id", "source_type", "source_id", "path", "created_at"),
                  [(rid, *r, self.ts(0, YEAR // 2)) for rid, r in zip(db.reserve("redirect_routes", len(redirects)), redirects)])

        self.copy("members", ("id", "source_id", "source_type", "member_namespace_id", "user_id", "access_level", "type",
                              "expires_at", "created_at"), self.member_rows)
        self.copy("project_authorizations", ("user_id", "project_id", "access_level"),
                  [(u, pr.id, pr.auth[u]) for pr in projects for u in pr.auth_users])

        # milestones and labels (group and project level) ----------------------------------
        ms_rows, lb_rows = [], []
        for g in groups:
            n_ms = rng.randint(1, 2) if g.parent is None else rng.randint(0, 1)
            for iid in range(1, n_ms + 1):
                ms_rows.append((None, g, iid))
            n_lb = rng.randint(3, 5) if g.parent is None else rng.randint(0, 2)
            for t in rng.sample(_LABELS, n_lb):
                lb_rows.append((None, g, t))
        for pr in projects:
            for iid in range(1, rng.randint(0, 3) + 1):
                ms_rows.append((pr, None, iid))
            for t in rng.sample(_LABELS, rng.randint(2, 5)):
                lb_rows.append((pr, None, t))
        ms_ids = db.reserve("milestones", len(ms_rows))
        rows = []
        for mid, (pr, g, iid) in zip(ms_ids, ms_rows):
            (pr or g).milestones.append(mid)
            rows.append((mid, pr.id if pr else None, g.id if g else None, iid, rng.choice(_MILESTONES),
                         rng.choice(["active", "active", "closed", None]),
                         self.maybe(date(2025, 1, 1) + timedelta(days=rng.randrange(500)), 0.3)))
        self.copy("milestones", ("id", "project_id", "group_id", "iid", "title", "state", "due_date"), rows)
        lb_ids = db.reserve("labels", len(lb_rows))
        rows = []
        for lid, (pr, g, t) in zip(lb_ids, lb_rows):
            (pr or g).labels.append(lid)
            rows.append((lid, pr.id if pr else None, g.id if g else None, t, f"#{rng.getrandbits(24):06x}",
                         self.maybe(rng.choice(_AWKWARD), 0.5)))
        self.copy("labels", ("id", "project_id", "group_id", "title", "color", "description"), rows)
        for pr in projects:
            ancestors = self.ancestors(pr)
            pr.avail_labels = pr.labels + [lid for g in ancestors for lid in g.labels]
            pr.avail_milestones = pr.milestones + [mid for g in ancestors for mid in g.milestones]

        # CI variables (encrypted, separate IV) ------------------------------------------
        rows = []
        for pr in projects:
            seen = set()
            for _ in range(rng.randint(0, 3)):
                k, scope = rng.choice(_CI_KEYS), rng.choice(_CI_SCOPES)
                if (k, scope) in seen:
                    continue
                seen.add((k, scope))
                v, iv = _enc(self.key, rng, f"{rng.choice(_CI_VALUES)}{pr.id}")
                rows.append((pr.id, k, v, iv, scope, rng.random() < 0.4, rng.random() < 0.5))
        if not rows:
            v, iv = _enc(self.key, rng, "fallback-secret")
            rows.append((projects[0].id, "API_TOKEN", v, iv, "*", False, True))
        self.copy("ci_variables", ("id", "project_id", "key", "encrypted_value", "encrypted_value_iv", "environment_scope",
                                   "protected", "masked"),
                  [(vid, *r) for vid, r in zip(db.reserve("ci_variables", len(rows)), rows)])
        rows = []
        for g in groups:
            if g.parent is None or rng.random() < 0.3:
                for k in rng.sample(_CI_KEYS, rng.randint(1, 2)):
                    v, iv = _enc(self.key, rng, f"{rng.choice(_CI_VALUES)}{g.id}")
                    rows.append((g.id, k, v, iv, rng.choice(_CI_SCOPES), rng.random() < 0.4))
        self.copy("ci_group_variables", ("id", "group_id", "key", "encrypted_value", "encrypted_value_iv",
                                         "environment_scope", "protected"),
                  [(vid, *r) for vid, r in zip(db.reserve("ci_group_variables", len(rows)), rows)])

        # group wikis -----------------------------------------------------------------------
        wiki_groups = [g for g in groups if g.idx == 0 or rng.random() < 0.4]
        self.copy("group_wiki_repositories", ("group_id", "shard_id", "disk_path"),
                  [(g.id, db.shards[rng.choice(db.shard_names)], _hashed("@groups", g.id)) for g in wiki_groups])

        # deploy keys, deploy tokens, protected branches, tokens, hooks ---------------------
        n_keys = 1 + len(projects) // 5
        key_ids = db.reserve("keys", n_keys)
        rows = []
        for kid in key_ids:
            blob = rng.randbytes(51)
            pub = "ssh-ed25519 " + base64.b64encode(blob).decode()
            rows.append((kid, org_id, rng.choice(self.ousers), "DeployKey", self.maybe(f"deploy {self.text(0.3)}", 0.1),
                         f"{pub} deploy@{self.path}", hashlib.sha256(blob).digest(), self.ts(-YEAR // 8, YEAR // 2)))
        self.copy("keys", ("id", "organization_id", "user_id", "type", "title", "key", "fingerprint_sha256", "created_at"), rows)
        rows = []
        for kid in key_ids:
            for pr in rng.sample(projects, min(len(projects), rng.randint(1, 3))):
                rows.append((kid, pr.id, rng.random() < 0.3))
        self.copy("deploy_keys_projects", ("id", "deploy_key_id", "project_id", "can_push"),
                  [(i, *r) for i, r in zip(db.reserve("deploy_keys_projects", len(rows)), rows)])
        n_tok = 1 + len(projects) // 8
        rows = []
        for tid in db.reserve("deploy_tokens", n_tok):
            on_group = rng.random() < 0.35
            rows.append((tid, None if on_group else rng.choice(projects).id, rng.choice(groups).id if on_group else None,
                         self.text(0.3), self.maybe(f"gitlab+deploy-token-{tid}", 0.2),
                         _enc_embedded(self.key, rng, f"gldt-{rng.getrandbits(120):x}"),
                         self.maybe(self.ts(YEAR, 2 * YEAR), 0.5)))
        self.copy("deploy_tokens", ("id", "project_id", "group_id", "name", "username", "token_encrypted", "expires_at"), rows)
        rows = []
        for pr in projects:
            rows.append((pr.id, None, "main"))
            if rng.random() < 0.3:
                rows.append((pr.id, None, "release/*"))
        for g in groups:
            if g.parent is None:
                rows.append((None, g.id, rng.choice(["main", "master", "stable-*"])))
        self.copy("protected_branches", ("id", "project_id", "namespace_id", "name", "allow_force_push", "created_at"),
                  [(i, *r, rng.random() < 0.1, self.ts(-YEAR // 8, YEAR // 2))
                   for i, r in zip(db.reserve("protected_branches", len(rows)), rows)])
        rows = []
        for u in self.ousers:
            for _ in range(rng.choice([0, 1, 1, 2])):
                token = f"glpat-{rng.getrandbits(120):x}"
                rows.append((org_id, u, self.text(0.3), hashlib.sha256(token.encode() + self.key).hexdigest(),
                             sorted(rng.sample(_SCOPES, rng.randint(0, 3))), self.maybe(rng.random() < 0.1, 0.1),
                             self.maybe(date(2025, 6, 1) + timedelta(days=rng.randrange(700)), 0.3), self.ts(0, YEAR)))
        self.copy("personal_access_tokens", ("id", "organization_id", "user_id", "name", "token_digest", "scopes", "revoked",
                                             "expires_at", "created_at"),
                  [(i, *r) for i, r in zip(db.reserve("personal_access_tokens", len(rows)), rows)])
        rows = [(pr.id, None, "ProjectHook", rng.choice(_HOOK_URLS), rng.random() < 0.8)
                for pr in projects if rng.random() < 0.2]
        rows += [(None, g.id, "GroupHook", rng.choice(_HOOK_URLS), True) for g in groups if g.parent is None]
        self.copy("web_hooks", ("id", "project_id", "group_id", "type", "url", "push_events"),
                  [(i, *r) for i, r in zip(db.reserve("web_hooks", len(rows)), rows)])

        # group avatars (uploads with model_type Namespace)
        self.avatar_groups = [g for g in groups if g.idx == 0 or rng.random() < 0.5]

    def settings_json(self, ns_id: int) -> dict:
        r = self.rng
        return {
            "theme": r.choice(["dark", "light", None]),
            "max_artifacts_size": r.choice([100, 1024, None]),
            "emoji": r.choice(["🚀", "ü", "日本"]),
            "nested": {"list": [1, 2.5, None, True, "x"], "quote": "\"q\"", "backslash": "\\", "newline": "a\nb\tc"},
            "ünïcode_key": ns_id,
            "empty": {},
        }

    def ancestors(self, pr: _Project) -> list[_Group]:
        out = []
        gi = pr.group
        while gi is not None:
            out.append(self.groups[gi])
            gi = self.groups[gi].parent
        return out

    # content: issues, MRs, notes, label links, events, CI, uploads, LFS, packages, ... --------
    def content(self) -> None:
        db, rng = self.db, self.rng
        structural = sum(self.counts[t] for t in ORG_TABLES)
        structural += len(self.avatar_groups)
        budget = max(self.spec.rows - structural, 0)
        wsum = sum(_CONTENT_WEIGHTS.values())
        tot = {t: max(1, round(budget * w / wsum)) for t, w in _CONTENT_WEIGHTS.items()}
        # snippets come with one snippet_repositories row each; push events with one event each
        tot["snippets"] = max(1, tot["snippets"] // 2)
        tot["push_event_payloads"] = max(1, tot["push_event_payloads"] // 2)
        projects = self.projects
        w = [pr.weight for pr in projects]

        # issues -------------------------------------------------------------------------
        n_issues = _apportion(tot["issues"], w)
        ids = iter(db.reserve("issues", sum(n_issues)))

        def issue_rows():
            for pr, n in zip(projects, n_issues):
                for iid in range(1, n + 1):
                    iss = next(ids)
                    pr.issues.append(iss)
                    created = self.ts(0, YEAR)
                    closed = rng.random() < 0.4
                    yield (iss, pr.ns_id, pr.id, iid, self.maybe(rng.choice(pr.auth_users), 0.02),
                           self.maybe(rng.choice(pr.avail_milestones), 0.5) if pr.avail_milestones else None,
                           self.text(), self.maybe(rng.choice(_DESCRIPTIONS), 0.25), 2 if closed else 1,
                           rng.random() < 0.05, self.maybe(rng.randrange(10), 0.6),
                           self.maybe(Decimal(rng.randrange(1_000_000)).scaleb(-2), 0.5),
                           created, created + timedelta(seconds=rng.randrange(30 * DAY)),
                           created + timedelta(days=rng.randrange(1, 60)) if closed else None)
        self.copy("issues", ("id", "namespace_id", "project_id", "iid", "author_id", "milestone_id", "title", "description",
                             "state_id", "confidential", "weight", "time_estimate", "created_at", "updated_at", "closed_at"),
                  issue_rows())

        # merge requests -----------------------------------------------------------------
        n_mrs = _apportion(tot["merge_requests"], w)
        forks_of = {}
        for _, forks in self.pools:
            for f in forks:
                forks_of.setdefault(f.forked_from, []).append(f.id)
        ids = iter(db.reserve("merge_requests", sum(n_mrs)))

        def mr_rows():
            for pr, n in zip(projects, n_mrs):
                for iid in range(1, n + 1):
                    mr = next(ids)
                    pr.mrs.append(mr)
                    created = self.ts(0, YEAR)
                    src = pr.id
                    x = rng.random()
                    if pr.id in forks_of and x < 0.3:
                        src = rng.choice(forks_of[pr.id])  # MR from an intra-org fork
                    elif x > 0.98:
                        src = None  # source project deleted
                    state = rng.choice([1, 1, 2, 3, 3, 3, 4])
                    yield (mr, pr.id, src, iid, self.maybe(rng.choice(pr.auth_users), 0.02),
                           self.maybe(rng.choice(pr.avail_milestones), 0.6) if pr.avail_milestones else None,
                           self.text(), self.maybe(rng.choice(_DESCRIPTIONS), 0.2),
                           f"feature/{rng.choice(_PROJECT_WORDS)}-{iid}", rng.choice(["main", "main", "develop", "release/1.0"]),
                           state, rng.choice(["can_be_merged", "cannot_be_merged", "unchecked"]),
                           created, created + timedelta(seconds=rng.randrange(30 * DAY)))
        self.copy("merge_requests", ("id", "target_project_id", "source_project_id", "iid", "author_id", "milestone_id",
                                     "title", "description", "source_branch", "target_branch", "state_id", "merge_status",
                                     "created_at", "updated_at"), mr_rows())

        # snippets (project and personal) + repositories ------------------------------------
        n_snip = tot["snippets"]
        n_personal = max(1, n_snip // 3)
        snip_proj = _apportion(n_snip - n_personal, w) if n_snip > n_personal else [0] * len(projects)
        snip_plan = [(pr, rng.choice(pr.auth_users)) for pr, n in zip(projects, snip_proj) for _ in range(n)]
        snip_plan += [(None, rng.choice(self.home)) for _ in range(n_personal)]
        snip_ids = db.reserve("snippets", len(snip_plan))
        self.snippets = list(zip(snip_ids, snip_plan))
        self.copy("snippets", ("id", "project_id", "organization_id", "author_id", "title", "type", "visibility_level",
                               "created_at"),
                  [(sid, pr.id if pr else None, None if pr else self.org_id, author, self.maybe(self.text(0.3), 0.1),
                    "ProjectSnippet" if pr else "PersonalSnippet", rng.choice([0, 10, 20]), self.ts(0, YEAR))
                   for sid, (pr, author) in self.snippets])
        self.copy("snippet_repositories", ("snippet_id", "shard_id", "disk_path"),
                  [(sid, db.shards[rng.choice(db.shard_names)], _hashed("@snippets", sid)) for sid, _ in self.snippets])

        # notes on issues, merge requests and snippets ----------------------------------------
        n_snip_notes = min(len(self.snippets) * 2, max(1, tot["notes"] // 100))
        n_notes = _apportion(tot["notes"] - n_snip_notes, [len(pr.issues) + len(pr.mrs) for pr in projects])
        # make sure the org has notes on both issues and merge requests
        forced = max(range(len(projects)), key=lambda i: (min(len(projects[i].issues), len(projects[i].mrs)) > 0, n_notes[i]))
        ids = iter(db.reserve("notes", sum(n_notes) + n_snip_notes))

        def note_rows():
            for pi, (pr, n) in enumerate(zip(projects, n_notes)):
                ni, nm = len(pr.issues), len(pr.mrs)
                for k in range(n):
                    nid = next(ids)
                    pr.notes.append(nid)
                    if pi == forced and k < 2 and ni and nm:
                        on_issue = k == 0
                    else:
                        on_issue = rng.randrange(ni + nm) < ni
                    system = rng.random() < 0.3
                    created = self.ts(0, YEAR)
                    if on_issue:
                        typ, target, ns, line_code = "Issue", rng.choice(pr.issues), pr.ns_id, None
                    else:
                        typ, target, ns = "MergeRequest", rng.choice(pr.mrs), None
                        line_code = f"{rng.getrandbits(160):040x}_{rng.randrange(500)}_{rng.randrange(500)}" if not system and rng.random() < 0.4 else None
                    text = rng.choice(_SYSTEM_NOTES) if system else (
                        rng.choice(_NOTES) if rng.random() < 0.8 else f"{rng.choice(_NOTES)}\n{rng.choice(_AWKWARD)}")
                    yield (nid, typ, target, pr.id, ns, self.maybe(rng.choice(pr.auth_users), 0.01),
                           self.maybe(text, 0.005), system, line_code, created,
                           created + timedelta(seconds=rng.randrange(DAY)))
            for k in range(n_snip_notes):
                sid, (pr, author) = self.snippets[k % len(self.snippets)]
                created = self.ts(0, YEAR)
                yield (next(ids), "Snippet", sid, pr.id if pr else None, None,
                       rng.choice(pr.auth_users) if pr else author, rng.choice(_NOTES), False, None, created, created)
        self.copy("notes", ("id", "noteable_type", "noteable_id", "project_id", "namespace_id", "author_id", "note", "system",
                            "line_code", "created_at", "updated_at"), note_rows())

        # label links ----------------------------------------------------------------------
        n_ll = _apportion(tot["label_links"], [len(pr.issues) + len(pr.mrs) for pr in projects])
        total_ll = 0
        plans = []
        for pr, n in zip(projects, n_ll):
            targets = len(pr.issues) + len(pr.mrs)
            n = min(n, targets * len(pr.avail_labels))
            plans.append(n)
            total_ll += n
        ids = iter(db.reserve("label_links", total_ll))

        def ll_rows():
            for pr, n in zip(projects, plans):
                seen: set[tuple[int, int, str]] = set()
                ni = len(pr.issues)
                tlen = ni + len(pr.mrs)
                while n > 0:
                    t = rng.randrange(tlen)
                    target, typ = (pr.issues[t], "Issue") if t < ni else (pr.mrs[t - ni], "MergeRequest")
                    lab = rng.choice(pr.avail_labels)
                    if (lab, target, typ) in seen:
                        # dense case: walk the labels deterministically to find a free one
                        free = [l for l in pr.avail_labels if (l, target, typ) not in seen]
                        if not free:
                            continue
                        lab = free[0]
                    seen.add((lab, target, typ))
                    n -= 1
                    yield (next(ids), lab, target, typ, self.ts(0, YEAR))
        self.copy("label_links", ("id", "label_id", "target_id", "target_type", "created_at"), ll_rows())

        # events (project and group level) and push payloads ---------------------------------
        n_push = _apportion(tot["push_event_payloads"], w)
        n_group_events = max(1, tot["events"] // 30)
        n_proj_events = _apportion(max(tot["events"] - n_group_events, 0), w)
        n_events = sum(n_push) + sum(n_proj_events) + n_group_events
        ids = iter(db.reserve("events", n_events))
        push_events: list[int] = []

        def event_rows():
            for pr, npush, nev in zip(projects, n_push, n_proj_events):
                for _ in range(npush):
                    eid = next(ids)
                    push_events.append(eid)
                    yield (eid, pr.id, None, rng.choice(pr.auth_users), None, None, 5, self.ts(0, YEAR))
                for _ in range(nev):
                    x = rng.random()
                    if x < 0.35 and pr.issues:
                        target, typ, action = rng.choice(pr.issues), "Issue", rng.choice([1, 1, 3])
                    elif x < 0.6 and pr.mrs:
                        target, typ, action = rng.choice(pr.mrs), "MergeRequest", rng.choice([1, 3, 7])
                    elif x < 0.9 and pr.notes:
                        target, typ, action = rng.choice(pr.notes), "Note", 6
                    else:
                        target, typ, action = None, None, rng.choice([8, 9, 1])
                    yield (next(ids), pr.id, None, rng.choice(pr.auth_users), target, typ, action, self.ts(0, YEAR))
            for _ in range(n_group_events):
                g = rng.choice(self.groups)
                yield (next(ids), None, g.id, rng.choice(sorted(g.effective)), None, None, rng.choice([1, 8, 9]), self.ts(0, YEAR))
        self.copy("events", ("id", "project_id", "group_id", "author_id", "target_id", "target_type", "action", "created_at"),
                  event_rows())

        def push_rows():
            for eid in push_events:
                action = rng.choice([2, 2, 2, 2, 0, 1])  # pushed, created, removed
                yield (eid, rng.randint(0 if action == 1 else 1, 20), action, 1 if rng.random() < 0.1 else 0,
                       None if action == 0 else rng.randbytes(20), None if action == 1 else rng.randbytes(20),
                       rng.choice(["main", "develop", f"feature/{rng.choice(_PROJECT_WORDS)}", "v1.0.0", "ünïcode-branch"]),
                       self.maybe(self.text(0.3), 0.1))
        self.copy("push_event_payloads", ("event_id", "commit_count", "action", "ref_type", "commit_from", "commit_to", "ref",
                                          "commit_title"), push_rows())

        # CI: pipelines, builds, artifacts over partitions 100, 101, 102 -----------------------
        n_pipes = _apportion(tot["p_ci_pipelines"], w)
        total_pipes = sum(n_pipes)
        pipe_ids = db.reserve("p_ci_pipelines", total_pipes)
        pipes = []  # (id, partition, project, created)
        k = 0
        for pr, n in zip(projects, n_pipes):
            for _ in range(n):
                # spread over the year so that old pipelines are in 100, newer in 101 and 102
                slot = (k + rng.random()) / max(total_pipes, 1)
                created = BASE + timedelta(seconds=self.t0 + int(slot * YEAR))
                part = 100 + min(2, int(slot * 3))
                pipes.append((pipe_ids[k], part, pr, created))
                k += 1
        self.copy("p_ci_pipelines", ("id", "partition_id", "project_id", "ref", "sha", "status", "source", "user_id",
                                     "duration", "created_at"),
                  [(pid, part, pr.id, self.maybe(rng.choice(["main", "develop", "refs/merge-requests/1/head", "v1.0"]), 0.05),
                    self.sha(), rng.choice(_STATUSES), self.maybe(rng.choice([1, 2, 4, 5, 7, 12]), 0.1),
                    self.maybe(rng.choice(pr.auth_users), 0.1), self.maybe(rng.randrange(30, 7200), 0.2), created)
                   for pid, part, pr, created in pipes])
        n_builds = _apportion(tot["p_ci_builds"], [rng.randint(1, 8) for _ in pipes])
        build_ids = iter(db.reserve("p_ci_builds", sum(n_builds)))
        builds = []  # (id, partition, project, created)

        def build_rows():
            for (pid, part, pr, created), n in zip(pipes, n_builds):
                for j in range(n):
                    bid = next(build_ids)
                    name, stage = _JOB_NAMES[j % len(_JOB_NAMES)]
                    status = rng.choice(_STATUSES)
                    started = None if status in ("pending", "skipped", "manual") else created + timedelta(seconds=rng.randrange(600))
                    finished = started + timedelta(seconds=rng.randrange(3600)) if started and status != "running" else None
                    builds.append((bid, part, pr, created))
                    yield (bid, part, pid, pr.id, name, self.maybe(stage, 0.05), status,
                           self.maybe(rng.choice(pr.auth_users), 0.1), started, finished,
                           self.maybe(rng.choice(_BUILD_OPTIONS), 0.15), created)
        self.copy("p_ci_builds", ("id", "partition_id", "commit_id", "project_id", "name", "stage", "status", "user_id",
                                  "started_at", "finished_at", "options", "created_at"), build_rows())
        n_art = _apportion(tot["p_ci_job_artifacts"], [rng.choice([0, 1, 1, 2, 3]) for _ in builds])
        art_ids = iter(db.reserve("p_ci_job_artifacts", sum(n_art)))

        def artifact_rows():
            for (bid, part, pr, created), n in zip(builds, n_art):
                for j in range(n):
                    ftype = (3, 1, 2, 4)[j % 4]  # trace, archive, metadata, junit
                    fname = {3: "job.log", 1: "artifacts.zip", 2: "metadata.gz", 4: "junit.xml.gz"}[ftype]
                    yield (next(art_ids), part, bid, pr.id, ftype, self.maybe(rng.randrange(1, 10**8), 0.05), fname,
                           self.maybe(rng.randbytes(32), 0.1), rng.choice([1, 2]),
                           self.maybe(created + timedelta(days=30), 0.3), created + timedelta(seconds=rng.randrange(3600)))
        self.copy("p_ci_job_artifacts", ("id", "partition_id", "job_id", "project_id", "file_type", "size", "file",
                                         "file_sha256", "file_store", "expire_at", "created_at"), artifact_rows())

        # LFS: objects of this org (cell-local rows) and links; shared objects and the cross-org fork
        lfs_projects = [pr for pr in projects if pr.lfs]
        n_links = _apportion(tot["lfs_objects_projects"], [pr.weight for pr in lfs_projects])
        link_plan: list[tuple[_Project, object]] = []  # object: int (existing id) or str (new oid)
        new_oids: list[str] = []
        org_oids: list[str] = []
        for pr, n in zip(lfs_projects, n_links):
            for j in range(n):
                if org_oids and rng.random() < 0.15:
                    link_plan.append((pr, rng.choice(org_oids)))  # same object in two projects of the org
                else:
                    oid = hashlib.sha256(f"{self.seed}:{self.path}:{pr.id}:{j}".encode()).hexdigest()
                    new_oids.append(oid)
                    org_oids.append(oid)
                    link_plan.append((pr, oid))
        for oid_id in self.shared_lfs:
            link_plan.append((projects[0], oid_id))
        if self.fork_from:
            fork = projects[-1]
            for oid_id in self.fork_from.lfs_object_ids:
                link_plan.append((fork, oid_id))  # the fork links the upstream's (other org's) objects
        lfs_ids = dict(zip(new_oids, db.reserve("lfs_objects", len(new_oids))))
        self.copy("lfs_objects", ("id", "oid", "size", "file", "file_store", "created_at"),
                  [(lfs_ids[oid], oid, rng.randrange(1, 10**9), f"{oid[0:2]}/{oid[2:4]}/{oid[4:]}", self.maybe(rng.choice([1, 2]), 0.05),
                    self.ts(0, YEAR)) for oid in new_oids])
        rows, seen = [], set()
        for pr, obj in link_plan:
            lid = lfs_ids[obj] if isinstance(obj, str) else obj
            rtype = self.maybe(rng.choice([0, 0, 0, 1, 2]), 0.1)
            if (pr.id, lid) in seen:
                continue
            seen.add((pr.id, lid))
            pr.lfs_objects.append(lid)
            rows.append((lid, pr.id, rtype, self.ts(0, YEAR)))
        self.copy("lfs_objects_projects", ("id", "lfs_object_id", "project_id", "repository_type", "created_at"),
                  [(i, *r) for i, r in zip(db.reserve("lfs_objects_projects", len(rows)), rows)])
        if self.make_fork_source:
            src, _ = self.pools[0]
            self.fork_out = _ForkSource(src.id, self.pool_ids[0], src.shard, src.path, sorted(set(src.lfs_objects))[:5])

        # uploads: group avatars (Namespace), project files (Project), note attachments (Note) ---
        rows = []
        for g in self.avatar_groups:
            rows.append((rng.randrange(1000, 10**6), f"uploads/-/system/group/avatar/{g.id}/avatar.png", self.sha256(),
                         g.id, "Namespace", "AvatarUploader", None, "avatar", 1))
        n_up = max(tot["uploads"] - len(rows), 2)
        n_note_up = n_up // 3
        for pr, n in zip(projects, _apportion(n_up - n_note_up, w)):
            for _ in range(n):
                secret = f"{rng.getrandbits(128):032x}"
                rows.append((rng.randrange(1, 10**7), f"{secret}/{rng.choice(_UPLOAD_NAMES)}", self.maybe(self.sha256(), 0.1),
                             pr.id, "Project", "FileUploader", secret, None, rng.choice([1, 1, 2])))
        note_projects = [pr for pr in projects if pr.notes]
        for _ in range(n_note_up if note_projects else 0):
            nid = rng.choice(rng.choice(note_projects).notes)
            rows.append((rng.randrange(1, 10**7), f"uploads/-/system/note/attachment/{nid}/{rng.choice(_UPLOAD_NAMES)}",
                         self.sha256(), nid, "Note", "AttachmentUploader", None, "attachment", 1))
        self.copy("uploads", ("id", "size", "path", "checksum", "model_id", "model_type", "uploader", "secret", "mount_point",
                              "store", "created_at"),
                  [(i, *r, self.ts(0, YEAR)) for i, r in zip(db.reserve("uploads", len(rows)), rows)])

        # container repositories ---------------------------------------------------------------
        reg_projects = [pr for pr in projects if rng.random() < 0.3] or projects[:1]
        rows = []
        for pr, n in zip(reg_projects, _apportion(tot["container_repositories"], [pr.weight for pr in reg_projects])):
            names = ["", "app", "worker", "db/migrate", "tools/ci-image", "ünïcode"][:max(n, 0)]
            names += [f"image-{j}" for j in range(n - len(names))]
            for name in names:
                rows.append((pr.id, name, self.maybe(rng.choice([0, 1, 2]), 0.7), self.ts(0, YEAR)))
        self.copy("container_repositories", ("id", "project_id", "name", "status", "created_at"),
                  [(i, *r) for i, r in zip(db.reserve("container_repositories", len(rows)), rows)])

        # packages and package files ------------------------------------------------------------
        pkg_projects = [pr for pr in projects if rng.random() < 0.3] or projects[:1]
        n_pkgs = _apportion(tot["packages_packages"], [pr.weight for pr in pkg_projects])
        pkg_ids = iter(db.reserve("packages_packages", sum(n_pkgs)))
        pkgs = []
        for pr, n in zip(pkg_projects, n_pkgs):
            for _ in range(n):
                name = rng.choice(_PKG_NAMES)
                version = self.maybe(f"{rng.randrange(3)}.{rng.randrange(20)}.{rng.randrange(10)}", 0.1)
                pkgs.append((next(pkg_ids), pr.id, name, version, rng.choice([1, 2, 3, 5, 7]), rng.choice([0, 0, 0, 1, 2]),
                             self.ts(0, YEAR)))
        self.copy("packages_packages", ("id", "project_id", "name", "version", "package_type", "status", "created_at"), pkgs)
        n_files = _apportion(tot["packages_package_files"], [rng.randint(1, 3) for _ in pkgs])
        file_ids = iter(db.reserve("packages_package_files", sum(n_files)))
        self.copy("packages_package_files", ("id", "package_id", "file_name", "size", "file_sha256", "file_store", "created_at"),
                  [(next(file_ids), pk[0], f"{_ascii_slug(pk[2])}-{pk[3] or 'latest'}{('.tgz', '.whl', '.jar', '.pom')[j % 4]}",
                    self.maybe(rng.randrange(100, 10**8), 0.05), self.maybe(rng.randbytes(32), 0.1),
                    self.maybe(rng.choice([1, 2]), 0.05), pk[6]) for pk, n in zip(pkgs, n_files) for j in range(n)])

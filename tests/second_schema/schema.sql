-- "Helpdesk": a small multi-tenant support-desk SaaS, used to prove that the planner works on a
-- schema orgmover was not written for. The tenant root is accounts; nothing here is GitLab-shaped.

CREATE TABLE schema_migrations (                       -- framework table: skip; preflight compares max(version)
    version text PRIMARY KEY
);

CREATE TABLE desk_settings (                           -- per-cell settings: skip
    id bigserial PRIMARY KEY,
    cell_name text NOT NULL,
    smtp_relay text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE accounts (                                -- tenant root
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    subdomain text NOT NULL UNIQUE,
    plan text NOT NULL DEFAULT 'basic',
    created_at timestamptz NOT NULL
);

CREATE TABLE priorities (                              -- cell-local lookup, shared, matched on code; ids differ per cell
    id bigserial PRIMARY KEY,
    code text NOT NULL UNIQUE,
    label text NOT NULL,
    weight integer NOT NULL
);

CREATE TABLE agents (                                  -- direct tenant key (dictionary sharding_key)
    id bigserial PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id),
    email text NOT NULL,
    display_name text NOT NULL,
    is_admin boolean NOT NULL DEFAULT false
);

CREATE TABLE customers (                               -- direct tenant key, not declared: inferred from the FK
    id bigserial PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id),
    email text NOT NULL,
    full_name text
);

CREATE TABLE tickets (                                 -- direct tenant key, remapped lookup, generated column
    id bigserial PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id),
    customer_id bigint NOT NULL REFERENCES customers (id),
    assignee_id bigint REFERENCES agents (id),
    priority_id bigint NOT NULL REFERENCES priorities (id),
    subject text NOT NULL,
    status text NOT NULL,
    subject_search text GENERATED ALWAYS AS (lower(subject)) STORED,
    opened_at timestamptz NOT NULL
);

CREATE TABLE ticket_comments (                         -- depth 2: ticket_id -> tickets.account_id
    id bigserial PRIMARY KEY,
    ticket_id bigint NOT NULL REFERENCES tickets (id),
    author_agent_id bigint REFERENCES agents (id),
    body text NOT NULL,
    internal boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL
);

CREATE TABLE comment_reactions (                       -- depth 3: comment_id -> ticket_comments -> tickets
    id bigserial PRIMARY KEY,
    comment_id bigint NOT NULL REFERENCES ticket_comments (id),
    emoji text NOT NULL
);

CREATE TABLE attachments (                             -- polymorphic owner; the uploader is NULL for customers' files
    id bigserial PRIMARY KEY,
    attachable_type text NOT NULL,
    attachable_id bigint NOT NULL,
    uploader_agent_id bigint REFERENCES agents (id),
    filename text NOT NULL,
    byte_size bigint NOT NULL
);

CREATE TABLE tags (                                    -- direct tenant key
    id bigserial PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id),
    name text NOT NULL,
    UNIQUE (account_id, name)
);

CREATE TABLE ticket_tags (                             -- composite primary key, no id
    ticket_id bigint NOT NULL REFERENCES tickets (id),
    tag_id bigint NOT NULL REFERENCES tags (id),
    PRIMARY KEY (ticket_id, tag_id)
);

CREATE TABLE teams (                                   -- self-referencing tree: only roots carry account_id
    id bigserial PRIMARY KEY,
    account_id bigint REFERENCES accounts (id),
    parent_team_id bigint REFERENCES teams (id),
    name text NOT NULL,
    CHECK ((account_id IS NULL) <> (parent_team_id IS NULL))
);

CREATE TABLE team_memberships (                        -- hangs off the tree (Rails-style FK names: team first)
    id bigserial PRIMARY KEY,
    team_id bigint NOT NULL,
    agent_id bigint NOT NULL,
    role text NOT NULL,
    CONSTRAINT fk_rails_0c4e5a7b21 FOREIGN KEY (team_id) REFERENCES teams (id),
    CONSTRAINT fk_rails_e83b2f9d10 FOREIGN KEY (agent_id) REFERENCES agents (id)
);

CREATE TABLE sla_policies (                            -- no primary key, a UNIQUE key of NOT NULL columns; off the tree
    team_id bigint NOT NULL REFERENCES teams (id),
    name text NOT NULL,
    response_minutes integer NOT NULL,
    UNIQUE (team_id, name)
);

CREATE TABLE ticket_events (                           -- partitioned, composite PK including the partition column
    id bigserial,
    account_id bigint NOT NULL REFERENCES accounts (id),
    ticket_id bigint NOT NULL REFERENCES tickets (id),
    kind text NOT NULL,
    payload jsonb NOT NULL DEFAULT '{}',
    occurred_at timestamptz NOT NULL,
    PRIMARY KEY (id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE TABLE ticket_events_2024 PARTITION OF ticket_events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE ticket_events_2025 PARTITION OF ticket_events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE ticket_events_2026 PARTITION OF ticket_events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');

CREATE TABLE canned_responses (                        -- in no dictionary file at all: inferred, with a warning
    id bigserial PRIMARY KEY,
    agent_id bigint NOT NULL REFERENCES agents (id),
    title text NOT NULL,
    body text NOT NULL
);

INSERT INTO schema_migrations (version) VALUES ('20250101000000'), ('20250301120000'), ('20250612093000');

-- GitLab-shaped schema for orgmover's local cells (modelled on GitLab's db/structure.sql and
-- db/docs, see ../shared/docs/gitlab-data-model.md). Identical on every cell; the version row in
-- schema_migrations is what preflight compares. Every id comes from a bigserial sequence that
-- `orgmover dev up` restricts to the cell's range (16 bits cell id, 41 bits sequence).

CREATE TABLE schema_migrations (version text PRIMARY KEY, finished_at timestamptz DEFAULT now());
CREATE TABLE ar_internal_metadata (key text PRIMARY KEY, value text, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());

-- per-cell settings and cell-local tables
CREATE TABLE application_settings (
  id bigserial PRIMARY KEY,
  signup_enabled boolean NOT NULL DEFAULT true,
  default_project_visibility integer NOT NULL DEFAULT 0,
  cell_name text,
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE shards (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE geo_nodes (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE, url text NOT NULL, "primary" boolean NOT NULL DEFAULT false);

-- organizations and users
CREATE TABLE organizations (
  id bigserial PRIMARY KEY,
  name text NOT NULL,
  path text NOT NULL UNIQUE,
  visibility_level smallint NOT NULL DEFAULT 0,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE users (
  id bigserial PRIMARY KEY,
  username text NOT NULL UNIQUE,
  email text NOT NULL UNIQUE,
  name text,
  state text NOT NULL DEFAULT 'active',
  admin boolean NOT NULL DEFAULT false,
  encrypted_otp_secret text,
  encrypted_otp_secret_iv text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE organization_users (
  id bigserial PRIMARY KEY,
  organization_id bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
  user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  access_level smallint NOT NULL DEFAULT 10,
  UNIQUE (organization_id, user_id)
);

-- namespaces: groups (parent_id trees), project namespaces, user namespaces
CREATE TABLE namespaces (
  id bigserial PRIMARY KEY,
  organization_id bigint NOT NULL REFERENCES organizations(id),
  name text NOT NULL,
  path text NOT NULL,
  type text NOT NULL CHECK (type IN ('Group', 'Project', 'User')),
  parent_id bigint REFERENCES namespaces(id) ON DELETE CASCADE,
  owner_id bigint REFERENCES users(id) ON DELETE SET NULL,
  traversal_ids bigint[] NOT NULL DEFAULT '{}',
  visibility_level integer NOT NULL DEFAULT 0,
  description text,
  runners_token_encrypted text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_namespaces_on_organization_id ON namespaces (organization_id);
CREATE INDEX index_namespaces_on_parent_id ON namespaces (parent_id);
CREATE TABLE namespace_settings (
  namespace_id bigint PRIMARY KEY REFERENCES namespaces(id) ON DELETE CASCADE,
  default_branch_name text,
  prevent_forking_outside_group boolean NOT NULL DEFAULT false,
  settings jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE pool_repositories (
  id bigserial PRIMARY KEY,
  shard_id bigint NOT NULL REFERENCES shards(id),
  disk_path text UNIQUE,
  state text,
  source_project_id bigint
);

CREATE TABLE projects (
  id bigserial PRIMARY KEY,
  organization_id bigint NOT NULL REFERENCES organizations(id),
  namespace_id bigint NOT NULL REFERENCES namespaces(id),
  project_namespace_id bigint UNIQUE REFERENCES namespaces(id) ON DELETE CASCADE,
  creator_id bigint REFERENCES users(id) ON DELETE SET NULL,
  name text NOT NULL,
  path text NOT NULL,
  description text,
  visibility_level integer NOT NULL DEFAULT 0,
  archived boolean NOT NULL DEFAULT false,
  repository_storage text NOT NULL DEFAULT 'default',
  pool_repository_id bigint REFERENCES pool_repositories(id) ON DELETE SET NULL,
  forked_from_project_id bigint,
  runners_token_encrypted text,
  star_count integer NOT NULL DEFAULT 0,
  last_activity_at timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_projects_on_namespace_id ON projects (namespace_id);
CREATE INDEX index_projects_on_organization_id ON projects (organization_id);
ALTER TABLE pool_repositories ADD CONSTRAINT fk_pool_repositories_source_project
  FOREIGN KEY (source_project_id) REFERENCES projects(id) ON DELETE SET NULL;
CREATE TABLE project_settings (
  project_id bigint PRIMARY KEY REFERENCES projects(id) ON DELETE CASCADE,
  show_default_award_emojis boolean NOT NULL DEFAULT true,
  squash_option smallint DEFAULT 3,
  cve_id_request_enabled boolean NOT NULL DEFAULT true,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE project_statistics (
  id bigserial PRIMARY KEY,
  project_id bigint NOT NULL UNIQUE REFERENCES projects(id) ON DELETE CASCADE,
  namespace_id bigint NOT NULL,
  commit_count bigint NOT NULL DEFAULT 0,
  storage_size bigint NOT NULL DEFAULT 0,
  repository_size bigint NOT NULL DEFAULT 0,
  lfs_objects_size bigint NOT NULL DEFAULT 0,
  build_artifacts_size bigint NOT NULL DEFAULT 0,
  packages_size bigint NOT NULL DEFAULT 0
);
CREATE TABLE project_features (
  id bigserial PRIMARY KEY,
  project_id bigint NOT NULL UNIQUE REFERENCES projects(id) ON DELETE CASCADE,
  issues_access_level integer NOT NULL DEFAULT 20,
  merge_requests_access_level integer NOT NULL DEFAULT 20,
  wiki_access_level integer NOT NULL DEFAULT 20,
  builds_access_level integer NOT NULL DEFAULT 20
);

-- routes (polymorphic source) and redirect_routes (no sharding key yet)
CREATE TABLE routes (
  id bigserial PRIMARY KEY,
  source_id bigint NOT NULL,
  source_type text NOT NULL,
  path text NOT NULL UNIQUE,
  name text,
  namespace_id bigint NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (source_type, source_id)
);
CREATE TABLE redirect_routes (
  id bigserial PRIMARY KEY,
  source_id bigint NOT NULL,
  source_type text NOT NULL,
  path text NOT NULL UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_redirect_routes_on_source ON redirect_routes (source_type, source_id);

CREATE TABLE members (
  id bigserial PRIMARY KEY,
  source_id bigint NOT NULL,
  source_type text NOT NULL,
  member_namespace_id bigint NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
  user_id bigint REFERENCES users(id) ON DELETE CASCADE,
  access_level integer NOT NULL,
  type text NOT NULL,
  expires_at date,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_members_on_member_namespace_id ON members (member_namespace_id);
-- no id column: composite primary key
CREATE TABLE project_authorizations (
  user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
  access_level integer NOT NULL,
  PRIMARY KEY (user_id, project_id, access_level)
);
CREATE INDEX index_project_authorizations_on_project_id ON project_authorizations (project_id);

-- issues, merge requests, notes, labels, milestones
CREATE TABLE milestones (
  id bigserial PRIMARY KEY,
  project_id bigint REFERENCES projects(id) ON DELETE CASCADE,
  group_id bigint REFERENCES namespaces(id) ON DELETE CASCADE,
  iid integer NOT NULL,
  title text NOT NULL,
  state text,
  due_date date,
  CHECK ((project_id IS NULL) <> (group_id IS NULL))
);
CREATE INDEX index_milestones_on_project_id ON milestones (project_id);
CREATE INDEX index_milestones_on_group_id ON milestones (group_id);
CREATE TABLE issues (
  id bigserial PRIMARY KEY,
  namespace_id bigint NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
  project_id bigint REFERENCES projects(id) ON DELETE CASCADE,
  iid integer NOT NULL,
  author_id bigint REFERENCES users(id) ON DELETE SET NULL,
  milestone_id bigint REFERENCES milestones(id) ON DELETE SET NULL,
  title text NOT NULL,
  description text,
  state_id smallint NOT NULL DEFAULT 1,
  confidential boolean NOT NULL DEFAULT false,
  weight integer,
  time_estimate numeric(12, 2),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  closed_at timestamptz,
  UNIQUE (namespace_id, iid)
);
CREATE INDEX index_issues_on_project_id ON issues (project_id);
CREATE TABLE merge_requests (
  id bigserial PRIMARY KEY,
  target_project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
  source_project_id bigint REFERENCES projects(id) ON DELETE SET NULL,
  iid integer NOT NULL,
  author_id bigint REFERENCES users(id) ON DELETE SET NULL,
  milestone_id bigint REFERENCES milestones(id) ON DELETE SET NULL,
  title text NOT NULL,
  description text,
  source_branch text NOT NULL,
  target_branch text NOT NULL,
  state_id smallint NOT NULL DEFAULT 1,
  merge_status text NOT NULL DEFAULT 'unchecked',
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (target_project_id, iid)
);
CREATE TABLE notes (
  id bigserial PRIMARY KEY,
  noteable_type text NOT NULL,
  noteable_id bigint NOT NULL,
  project_id bigint REFERENCES projects(id) ON DELETE CASCADE,
  namespace_id bigint REFERENCES namespaces(id) ON DELETE CASCADE,
  author_id bigint REFERENCES users(id) ON DELETE SET NULL,
  note text,
  system boolean NOT NULL DEFAULT false,
  line_code text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_notes_on_noteable ON notes (noteable_type, noteable_id);
CREATE TABLE labels (
  id bigserial PRIMARY KEY,
  project_id bigint REFERENCES projects(id) ON DELETE CASCADE,
  group_id bigint REFERENCES namespaces(id) ON DELETE CASCADE,
  title text NOT NULL,
  color text NOT NULL,
  description text,
  CHECK ((project_id IS NULL) <> (group_id IS NULL))
);
CREATE INDEX index_labels_on_project_id ON labels (project_id);
CREATE INDEX index_labels_on_group_id ON labels (group_id);
CREATE TABLE label_links (
  id bigserial PRIMARY KEY,
  label_id bigint NOT NULL REFERENCES labels(id) ON DELETE CASCADE,
  target_id bigint NOT NULL,
  target_type text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_label_links_on_label_id ON label_links (label_id);

CREATE TABLE events (
  id bigserial PRIMARY KEY,
  project_id bigint REFERENCES projects(id) ON DELETE CASCADE,
  group_id bigint REFERENCES namespaces(id) ON DELETE CASCADE,
  author_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  target_id bigint,
  target_type text,
  action smallint NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  CHECK (project_id IS NOT NULL OR group_id IS NOT NULL)
);
CREATE INDEX index_events_on_project_id ON events (project_id);
CREATE INDEX index_events_on_group_id ON events (group_id);
-- no id column, a unique key instead of a primary key
CREATE TABLE push_event_payloads (
  event_id bigint NOT NULL UNIQUE REFERENCES events(id) ON DELETE CASCADE,
  commit_count bigint NOT NULL,
  action smallint NOT NULL,
  ref_type smallint NOT NULL,
  commit_from bytea,
  commit_to bytea,
  ref text,
  commit_title text
);

-- CI: partitioned by LIST (partition_id), primary key (id, partition_id), composite foreign keys
CREATE TABLE p_ci_pipelines (
  id bigserial NOT NULL,
  partition_id bigint NOT NULL,
  project_id bigint NOT NULL,
  ref text,
  sha text,
  status text NOT NULL,
  source smallint,
  user_id bigint,
  duration integer,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (id, partition_id)
) PARTITION BY LIST (partition_id);
CREATE TABLE ci_pipelines_100 PARTITION OF p_ci_pipelines FOR VALUES IN (100);
CREATE TABLE ci_pipelines_101 PARTITION OF p_ci_pipelines FOR VALUES IN (101);
CREATE TABLE ci_pipelines_102 PARTITION OF p_ci_pipelines FOR VALUES IN (102);
CREATE INDEX index_p_ci_pipelines_on_project_id ON p_ci_pipelines (project_id);
ALTER TABLE p_ci_pipelines ADD CONSTRAINT fk_p_ci_pipelines_project FOREIGN KEY (project_id) REFERENCES projects(id) ON DELETE CASCADE;

CREATE TABLE p_ci_builds (
  id bigserial NOT NULL,
  partition_id bigint NOT NULL,
  commit_id bigint NOT NULL,
  project_id bigint NOT NULL,
  name text NOT NULL,
  stage text,
  status text NOT NULL,
  user_id bigint,
  started_at timestamptz,
  finished_at timestamptz,
  options jsonb,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (id, partition_id)
) PARTITION BY LIST (partition_id);
CREATE TABLE ci_builds_100 PARTITION OF p_ci_builds FOR VALUES IN (100);
CREATE TABLE ci_builds_101 PARTITION OF p_ci_builds FOR VALUES IN (101);
CREATE TABLE ci_builds_102 PARTITION OF p_ci_builds FOR VALUES IN (102);
CREATE INDEX index_p_ci_builds_on_project_id ON p_ci_builds (project_id);
ALTER TABLE p_ci_builds ADD CONSTRAINT fk_p_ci_builds_pipeline FOREIGN KEY (partition_id, commit_id)
  REFERENCES p_ci_pipelines (partition_id, id) ON DELETE CASCADE;
ALTER TABLE p_ci_builds ADD CONSTRAINT fk_p_ci_builds_project FOREIGN KEY (project_id) REFERENCES projects(id) ON DELETE CASCADE;

CREATE TABLE p_ci_job_artifacts (
  id bigserial NOT NULL,
  partition_id bigint NOT NULL,
  job_id bigint NOT NULL,
  project_id bigint NOT NULL,
  file_type smallint NOT NULL,
  size bigint,
  file text,
  file_sha256 bytea,
  file_store smallint NOT NULL DEFAULT 1,
  expire_at timestamptz,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (id, partition_id)
) PARTITION BY LIST (partition_id);
CREATE TABLE ci_job_artifacts_100 PARTITION OF p_ci_job_artifacts FOR VALUES IN (100);
CREATE TABLE ci_job_artifacts_101 PARTITION OF p_ci_job_artifacts FOR VALUES IN (101);
CREATE TABLE ci_job_artifacts_102 PARTITION OF p_ci_job_artifacts FOR VALUES IN (102);
CREATE INDEX index_p_ci_job_artifacts_on_project_id ON p_ci_job_artifacts (project_id);
ALTER TABLE p_ci_job_artifacts ADD CONSTRAINT fk_p_ci_job_artifacts_job FOREIGN KEY (partition_id, job_id)
  REFERENCES p_ci_builds (partition_id, id) ON DELETE CASCADE;
ALTER TABLE p_ci_job_artifacts ADD CONSTRAINT fk_p_ci_job_artifacts_project FOREIGN KEY (project_id) REFERENCES projects(id) ON DELETE CASCADE;

-- CI variables with AES-256-GCM encrypted values (base64 ciphertext+tag, base64 12-byte IV)
CREATE TABLE ci_variables (
  id bigserial PRIMARY KEY,
  project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
  key text NOT NULL,
  encrypted_value text,
  encrypted_value_iv text,
  environment_scope text NOT NULL DEFAULT '*',
  protected boolean NOT NULL DEFAULT false,
  masked boolean NOT NULL DEFAULT false,
  UNIQUE (project_id, key, environment_scope)
);
CREATE TABLE ci_group_variables (
  id bigserial PRIMARY KEY,
  group_id bigint NOT NULL REFERENCES namespaces(id) ON DELETE CASCADE,
  key text NOT NULL,
  encrypted_value text,
  encrypted_value_iv text,
  environment_scope text NOT NULL DEFAULT '*',
  protected boolean NOT NULL DEFAULT false,
  UNIQUE (group_id, key, environment_scope)
);

-- repositories on Gitaly storages (shards)
CREATE TABLE project_repositories (
  id bigserial PRIMARY KEY,
  project_id bigint NOT NULL UNIQUE REFERENCES projects(id) ON DELETE CASCADE,
  shard_id bigint NOT NULL REFERENCES shards(id),
  disk_path text NOT NULL UNIQUE,
  object_format smallint NOT NULL DEFAULT 0
);
CREATE TABLE snippets (
  id bigserial PRIMARY KEY,
  project_id bigint REFERENCES projects(id) ON DELETE CASCADE,
  organization_id bigint REFERENCES organizations(id) ON DELETE CASCADE,
  author_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  title text,
  type text,
  visibility_level integer NOT NULL DEFAULT 0,
  created_at timestamptz NOT NULL DEFAULT now(),
  CHECK (project_id IS NOT NULL OR organization_id IS NOT NULL)
);
CREATE TABLE snippet_repositories (
  snippet_id bigint PRIMARY KEY REFERENCES snippets(id) ON DELETE CASCADE,
  shard_id bigint NOT NULL REFERENCES shards(id),
  disk_path text NOT NULL UNIQUE
);
CREATE TABLE group_wiki_repositories (
  group_id bigint PRIMARY KEY REFERENCES namespaces(id) ON DELETE CASCADE,
  shard_id bigint NOT NULL REFERENCES shards(id),
  disk_path text NOT NULL UNIQUE
);

-- LFS: lfs_objects is cell-local with one row per oid; lfs_objects_projects links projects to it
CREATE TABLE lfs_objects (
  id bigserial PRIMARY KEY,
  oid text NOT NULL UNIQUE,
  size bigint NOT NULL,
  file text,
  file_store integer DEFAULT 1,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE lfs_objects_projects (
  id bigserial PRIMARY KEY,
  lfs_object_id bigint NOT NULL REFERENCES lfs_objects(id),
  project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
  repository_type smallint,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (project_id, lfs_object_id, repository_type)
);

-- uploads: polymorphic owner (model_type, model_id)
CREATE TABLE uploads (
  id bigserial PRIMARY KEY,
  size bigint NOT NULL,
  path text NOT NULL,
  checksum text,
  model_id bigint NOT NULL,
  model_type text NOT NULL,
  uploader text NOT NULL,
  secret text,
  mount_point text,
  store integer NOT NULL DEFAULT 1,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_uploads_on_model ON uploads (model_type, model_id);

CREATE TABLE container_repositories (
  id bigserial PRIMARY KEY,
  project_id bigint NOT NULL REFERENCES projects(id),
  name text NOT NULL,
  status smallint,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (project_id, name)
);
CREATE TABLE packages_packages (
  id bigserial PRIMARY KEY,
  project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
  name text NOT NULL,
  version text,
  package_type smallint NOT NULL,
  status smallint NOT NULL DEFAULT 0,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_packages_packages_on_project_id ON packages_packages (project_id);
CREATE TABLE packages_package_files (
  id bigserial PRIMARY KEY,
  package_id bigint NOT NULL REFERENCES packages_packages(id) ON DELETE CASCADE,
  file_name text NOT NULL,
  size bigint,
  file_sha256 bytea,
  file_store integer DEFAULT 1,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_packages_package_files_on_package_id ON packages_package_files (package_id);

-- keys: SSH keys of users and deploy keys
CREATE TABLE keys (
  id bigserial PRIMARY KEY,
  organization_id bigint REFERENCES organizations(id) ON DELETE CASCADE,
  user_id bigint REFERENCES users(id) ON DELETE CASCADE,
  type text,
  title text,
  key text NOT NULL,
  fingerprint_sha256 bytea,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE deploy_keys_projects (
  id bigserial PRIMARY KEY,
  deploy_key_id bigint NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
  project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
  can_push boolean NOT NULL DEFAULT false
);
CREATE TABLE deploy_tokens (
  id bigserial PRIMARY KEY,
  project_id bigint REFERENCES projects(id) ON DELETE CASCADE,
  group_id bigint REFERENCES namespaces(id) ON DELETE CASCADE,
  name text NOT NULL,
  username text,
  token_encrypted text,
  expires_at timestamptz,
  CHECK ((project_id IS NULL) <> (group_id IS NULL))
);

-- exactly one of project_id / namespace_id is set
CREATE TABLE protected_branches (
  id bigserial PRIMARY KEY,
  project_id bigint REFERENCES projects(id) ON DELETE CASCADE,
  namespace_id bigint REFERENCES namespaces(id) ON DELETE CASCADE,
  name text NOT NULL,
  allow_force_push boolean NOT NULL DEFAULT false,
  created_at timestamptz NOT NULL DEFAULT now(),
  CHECK ((project_id IS NULL) <> (namespace_id IS NULL))
);
CREATE TABLE personal_access_tokens (
  id bigserial PRIMARY KEY,
  organization_id bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
  user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name text NOT NULL,
  token_digest text,
  scopes text[] NOT NULL DEFAULT '{}',
  revoked boolean DEFAULT false,
  expires_at date,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_personal_access_tokens_on_organization_id ON personal_access_tokens (organization_id);

CREATE TABLE web_hooks (
  id bigserial PRIMARY KEY,
  project_id bigint REFERENCES projects(id) ON DELETE CASCADE,
  group_id bigint REFERENCES namespaces(id) ON DELETE CASCADE,
  type text NOT NULL,
  url text NOT NULL,
  push_events boolean NOT NULL DEFAULT true,
  CHECK ((project_id IS NULL) <> (group_id IS NULL))
);

INSERT INTO schema_migrations (version) VALUES ('20261101000000');

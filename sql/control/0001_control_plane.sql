-- Control plane: accounts, sessions, projects, members and API keys.
-- Secrets (passwords, session tokens, API keys) are stored only as hashes.
CREATE SCHEMA IF NOT EXISTS fluxbase;

CREATE TABLE fluxbase.users (
    id            text PRIMARY KEY,
    email         text NOT NULL,
    display_name  text,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_ci ON fluxbase.users (lower(email));

CREATE TABLE fluxbase.sessions (
    token_hash bytea PRIMARY KEY,
    user_id    text NOT NULL REFERENCES fluxbase.users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX sessions_expiry ON fluxbase.sessions (expires_at);

CREATE TABLE fluxbase.projects (
    id              text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{16}$'),
    name            text NOT NULL,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    realtime_public boolean NOT NULL DEFAULT false,
    db_name         text NOT NULL UNIQUE,
    -- Highest sql/project/ migration applied to this project's database.
    bootstrap_version integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE fluxbase.members (
    project_id text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    user_id    text NOT NULL REFERENCES fluxbase.users (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('admin', 'developer', 'viewer')),
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX members_user ON fluxbase.members (user_id);

CREATE TABLE fluxbase.api_keys (
    id           text PRIMARY KEY,
    project_id   text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    name         text NOT NULL,
    scope        text NOT NULL CHECK (scope IN ('read', 'readwrite', 'admin')),
    key_hash     bytea NOT NULL UNIQUE,
    prefix       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_project ON fluxbase.api_keys (project_id);

-- Which default user and project `fluxbase init` created (so a second init reuses them).
CREATE TABLE fluxbase.instance (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    default_user    text REFERENCES fluxbase.users (id) ON DELETE SET NULL,
    default_project text REFERENCES fluxbase.projects (id) ON DELETE SET NULL,
    initialized_at  timestamptz NOT NULL DEFAULT now()
);

-- Only the server's own role may connect to the control database.
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
END $$;
REVOKE ALL ON SCHEMA fluxbase FROM PUBLIC;

-- Team invitations. One row per project and email address (any case): a new invitation to the
-- same address replaces the earlier one, whatever its state, with a new id, so an old link can
-- no longer be answered. An invitee's account is found by email when they answer.
CREATE TABLE fluxbase.invites (
    id           text PRIMARY KEY,
    project_id   text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    email        text NOT NULL,
    role         text NOT NULL CHECK (role IN ('admin', 'developer', 'viewer')),
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'accepted', 'rejected')),
    -- Who sent it: a user id, or the id of the admin key.
    invited_by   text NOT NULL,
    invited_at   timestamptz NOT NULL DEFAULT now(),
    responded_at timestamptz
);
CREATE UNIQUE INDEX invites_project_email ON fluxbase.invites (project_id, lower(email));
CREATE INDEX invites_pending_email ON fluxbase.invites (lower(email)) WHERE status = 'pending';

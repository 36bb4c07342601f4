-- Webhooks and their delivery outbox. A delivery row is written (in the same transaction for all
-- of a committed change's matches) before the change stream may confirm that change's position,
-- so a crash loses no delivery; (webhook_id, event_id) is unique, so a replayed change does not
-- produce a second delivery.
CREATE TABLE fluxbase.webhooks (
    id              text PRIMARY KEY,
    project_id      text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    url             text NOT NULL,
    events          text[] NOT NULL,
    tables          text[],
    secret          text NOT NULL,
    enabled         boolean NOT NULL DEFAULT true,
    disabled_reason text,
    failing_since   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_project ON fluxbase.webhooks (project_id);

CREATE TABLE fluxbase.webhook_deliveries (
    id              text PRIMARY KEY,
    webhook_id      text NOT NULL REFERENCES fluxbase.webhooks (id) ON DELETE CASCADE,
    project_id      text NOT NULL,
    event_id        text NOT NULL,
    event_type      text NOT NULL,
    body            text NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    response_status integer,
    response_body   text,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (webhook_id, event_id)
);
-- Pending deliveries of a webhook in commit order, and which webhooks have one due: both stay
-- small however many delivered rows the retention period keeps.
CREATE INDEX webhook_deliveries_pending ON fluxbase.webhook_deliveries (webhook_id, created_at, event_id)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_due ON fluxbase.webhook_deliveries (webhook_id, next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_webhook ON fluxbase.webhook_deliveries (webhook_id, created_at DESC);

-- Webhook ordering (issue 19). `ordering` says which deliveries of a webhook may be in flight
-- together:
--   'row'    (the default for new webhooks): deliveries of the same row never overlap and keep
--            commit order, a schema change waits for every earlier delivery and holds every later
--            one, the others go out concurrently up to `webhook_max_in_flight`.
--   'strict' one delivery in flight, oldest first (the behaviour before this migration, which
--            webhooks registered before it keep: their receivers may rely on it).
ALTER TABLE fluxbase.webhooks
    ADD COLUMN ordering text NOT NULL DEFAULT 'strict' CHECK (ordering IN ('row', 'strict'));
ALTER TABLE fluxbase.webhooks ALTER COLUMN ordering SET DEFAULT 'row';

-- What the delivery worker orders a delivery by, written by the outbox writer with the delivery
-- (so that a restart keeps the rules): the keys of the rows it changes (one, or two for an
-- update that changed the row's key); NULL for a barrier (a schema change, and every delivery
-- stored before this migration, so that those keep their strict order).
ALTER TABLE fluxbase.webhook_deliveries ADD COLUMN row_keys text[];

-- How many times a delivery was asked to be sent again (POST /api/webhooks/redeliver). An
-- attempt records its outcome only if the count is still the one it read: a redelivery asked
-- for while an attempt was in flight, or before its success was recorded (within ~100 ms),
-- was overwritten by that success and never sent (red team rt12). A constant default: no
-- rewrite of the outbox.
ALTER TABLE fluxbase.webhook_deliveries ADD COLUMN requeues int NOT NULL DEFAULT 0;

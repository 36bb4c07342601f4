-- The hash of the admin key's secret that sent an invitation (NULL: sent by a member, or
-- before this migration). The invitation is answerable only while the key still has that
-- secret: a request authenticated with the old secret just before a rotation committed could
-- send one that a time comparison counted for the new secret (red team rt15). Nullable, no
-- default: no rewrite of the table.
ALTER TABLE fluxbase.invites ADD COLUMN invited_by_key_hash bytea;

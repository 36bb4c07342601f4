-- When a key's secret was last replaced (NULL: never). An invitation sent with an admin key is
-- answerable only while that key is live, admin and not rotated since it was sent: a leaked
-- key revoked or rotated no longer lets its holder's invitations in (red team rt13). Nullable,
-- no default: no rewrite of the table.
ALTER TABLE fluxbase.api_keys ADD COLUMN rotated_at timestamptz;

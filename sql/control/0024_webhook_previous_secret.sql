-- The signing secret a rotation replaced, and until when attempts are still signed with it
-- beside the new one (Standard Webhooks' `webhook-signature` carries both): a receiver that
-- still checks the old secret accepts every delivery while it is switched over. Nullable, no
-- default: no rewrite of the table.
ALTER TABLE fluxbase.webhooks ADD COLUMN previous_secret text,
                              ADD COLUMN previous_secret_until timestamptz;

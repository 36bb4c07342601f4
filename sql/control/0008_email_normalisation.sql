-- Email addresses are stored normalised: Unicode NFKC, then lowercase (src/accounts.rs,
-- `normalize_email`), so look-alike spellings (the Kelvin sign in "\u212Aate@example.com",
-- fullwidth "ｋａｔｅ@example.com") are one address, and the unique index on lower(email)
-- refuses them as duplicates. Rows written before are normalised here when PostgreSQL can
-- (a UTF8 database). An address whose normalised form is shared by another row is left as it is
-- (which would break the unique index otherwise); normalised input never matches it again, so
-- only the account that owns the normalised spelling can log in or be invited.
DO $$
BEGIN
    IF current_setting('server_encoding') = 'UTF8' THEN
        UPDATE fluxbase.users u SET email = lower(normalize(u.email, NFKC))
        WHERE u.email <> lower(normalize(u.email, NFKC))
          AND NOT EXISTS (
              SELECT 1 FROM fluxbase.users o
              WHERE o.id <> u.id
                AND lower(normalize(o.email, NFKC)) = lower(normalize(u.email, NFKC)));
        UPDATE fluxbase.invites i SET email = lower(normalize(i.email, NFKC))
        WHERE i.email <> lower(normalize(i.email, NFKC))
          AND NOT EXISTS (
              SELECT 1 FROM fluxbase.invites o
              WHERE o.id <> i.id AND o.project_id = i.project_id
                AND lower(normalize(o.email, NFKC)) = lower(normalize(i.email, NFKC)));
    END IF;
END
$$;

-- Session 24: two mendings of 0014 (issue 19).
--
-- 1. The one-argument `auth.reset_session(alone)` (kept for servers of the previous version
--    during an upgrade) was a second copy of the reset's body, which every fix had to be made
--    twice in (and 0014's copy already differed: no epoch read, DISCARD TEMP last). It now
--    delegates to `auth.reset_session(alone, NULL)`: every check, the same body. Qualified as
--    the two-argument one is (see 0014: PL/pgSQL resolves names with the caller's search_path).
--
-- 2. After a crash the unlogged epoch table is empty and `auth.routine_epoch_now()` fills it
--    sealed, "every older transaction is gone". Not so for prepared transactions
--    (max_prepared_transactions > 0): they survive a crash, and one that made a routine fired
--    its trigger's bump into the unlogged table, which the crash emptied, so when it commits
--    later nothing counts its routine. The row is now sealed only when no prepared transaction
--    of this database exists; otherwise it stays unsealed (`safe` false: every reset runs its
--    checks) until the server's start-up seals it once they ended (src/projects/provision.rs).
-- Placeholders: {owner}, {readwrite}, {read}, {auth} (quoted identifiers).
SET LOCAL fluxbase.cdc_internal = 'on';
SET LOCAL ROLE {auth};

CREATE OR REPLACE FUNCTION auth.reset_session(alone pg_catalog.bool) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM auth.reset_session(alone, NULL::pg_catalog.int8);
END
$$;
REVOKE ALL ON FUNCTION auth.reset_session(boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth.reset_session(boolean) TO {owner}, {readwrite}, {read};

CREATE OR REPLACE FUNCTION auth.routine_epoch_now(OUT n bigint, OUT safe boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_catalog.current_setting('transaction_read_only') = 'on' THEN
        -- Unknown for now (the reset then runs its checks); the next reset fills it.
        RETURN;
    END IF;
    -- Empty only after a crash (UNLOGGED): every older transaction is gone but the prepared
    -- ones, which survive it.
    INSERT INTO auth.routine_epoch AS e (id, n, safe, sealed)
        SELECT true, 1, false, NOT EXISTS (
            SELECT FROM pg_catalog.pg_prepared_xacts p
            WHERE p.database OPERATOR(pg_catalog.=) pg_catalog.current_database())
        ON CONFLICT (id) DO NOTHING;
    IF FOUND THEN
        UPDATE auth.routine_epoch e SET safe = e.sealed AND auth.only_our_routines();
    END IF;
    SELECT e.n, e.safe INTO n, safe FROM auth.routine_epoch e;
END
$$;
REVOKE ALL ON FUNCTION auth.routine_epoch_now() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth.routine_epoch_now() TO {owner}, {readwrite}, {read};

RESET ROLE;

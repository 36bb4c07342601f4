-- The reset of a pooled SQL connection between two requests: what DISCARD ALL resets, except
-- the protocol-level prepared statements the server keeps on the connection (DISCARD ALL
-- would drop them, and every request would parse and plan its statement again: see
-- replication/src/wire/cached.rs). The server runs it in the same round trip as the next
-- request's statement, inside that statement's transaction, or on its own before a script.
-- Placeholders: {owner}, {readwrite}, {read}, {auth} (quoted identifiers).
--
--  * RESET ALL and RESET ROLE: every setting back to the session's start (the connection's
--    startup options: statement_timeout, DateStyle, ...), custom ones (set_config) included.
--  * pg_advisory_unlock_all(): session-level advisory locks.
--  * UNLISTEN *, CLOSE of WITH HOLD cursors (the others end with their transaction),
--    DEALLOCATE of statements prepared with SQL's PREPARE (from_sql): only when there are any.
--    UNLISTEN takes effect at commit: inside the next statement's transaction (alone = false)
--    the channels would still show, so the call raises FX002 and the server runs it on its own
--    (alone = true) first.
--  * DISCARD TEMP once the session has a temporary schema; DISCARD SEQUENCES (currval/lastval).
-- SECURITY INVOKER: it acts on the caller's session as the caller. Every name is qualified
-- with pg_catalog, operators included, so a caller's objects or search_path cannot change what
-- it runs. Owned by {auth} (see 0004_rls.sql), so no project role can replace it.
SET LOCAL fluxbase.cdc_internal = 'on';
SET LOCAL ROLE {auth};

CREATE FUNCTION auth.reset_session(alone boolean) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    name text;
BEGIN
    RESET ALL;
    RESET ROLE;
    PERFORM pg_catalog.pg_advisory_unlock_all();
    IF EXISTS (SELECT FROM pg_catalog.pg_listening_channels()) THEN
        IF NOT alone THEN
            RAISE EXCEPTION 'the session listens: reset it on its own' USING ERRCODE = 'FX002';
        END IF;
        EXECUTE 'UNLISTEN *';
    END IF;
    FOR name IN SELECT c.name FROM pg_catalog.pg_cursors c WHERE c.is_holdable LOOP
        EXECUTE pg_catalog.format('CLOSE %I', name);
    END LOOP;
    FOR name IN SELECT p.name FROM pg_catalog.pg_prepared_statements p WHERE p.from_sql LOOP
        EXECUTE pg_catalog.format('DEALLOCATE %I', name);
    END LOOP;
    IF pg_catalog.pg_my_temp_schema() OPERATOR(pg_catalog.<>) 0 THEN
        EXECUTE 'DISCARD TEMP';
    END IF;
    EXECUTE 'DISCARD SEQUENCES';
END
$$;

REVOKE ALL ON FUNCTION auth.reset_session(boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth.reset_session(boolean) TO {owner}, {readwrite}, {read};

RESET ROLE;

-- Session 26 (issue 19, review of the param-less path): the pipelined reset refuses to run inside
-- a transaction that began under the previous request's session defaults.
--
-- Why. The pipelined reset is the first statement of the request's own transaction, which
-- PostgreSQL began, at that call, with the session's defaults of the moment: a previous request
-- that ran `SELECT set_config('default_transaction_read_only', 'on', false)` (a plain SELECT,
-- vouched) left the next request's transaction read only (its INSERT refused with 25006, and
-- the failure rolled back the reset's RESET ALL, so every later one too), and one that set
-- `default_transaction_isolation` to 'repeatable read' left the next request's epoch read with
-- a snapshot taken before it waited for 0017's lock: a routine committed meanwhile was unseen,
-- the request vouched, and the routine could replace the kept `fx_reset`. RESET ALL cannot
-- change the characteristics of a transaction already running.
--
-- How. Outside READ COMMITTED, READ WRITE, NOT DEFERRABLE the pipelined reset raises FX002, as
-- it does for a listening session: the server runs the reset on its own, in a transaction of
-- its own (its commit restores the cluster's defaults), then the request's round again.
-- Placeholders: {owner}, {readwrite}, {read}, {auth} (quoted identifiers).
SET LOCAL fluxbase.cdc_internal = 'on';
SET LOCAL ROLE {auth};

CREATE OR REPLACE FUNCTION auth.reset_session(alone pg_catalog.bool, known pg_catalog.int8)
RETURNS pg_catalog.int8
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    name pg_catalog.text;
    unlocked pg_catalog.bool;
    epoch pg_catalog.int8;
    safe pg_catalog.bool;
BEGIN
    -- The request's transaction began (at this call, the first of its Sync group) under the
    -- previous request's session defaults, which RESET ALL below cannot change for a
    -- transaction already running: read only or deferrable (the next request's writes refused),
    -- or another isolation level (the epoch read's snapshot taken before the lock below it
    -- waits for, so a routine committed meanwhile would go unseen: 0017's argument needs READ
    -- COMMITTED). Then the reset runs on its own, in a transaction of its own whose commit
    -- makes the defaults the cluster's again, and the request in the next one.
    IF NOT alone AND (
        pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.<>) 'read committed'
        OR pg_catalog.current_setting('transaction_read_only') OPERATOR(pg_catalog.<>) 'off'
        OR pg_catalog.current_setting('transaction_deferrable') OPERATOR(pg_catalog.<>) 'off') THEN
        RAISE EXCEPTION 'the transaction began under the previous request''s defaults: reset it on its own'
            USING ERRCODE = 'FX002';
    END IF;
    RESET ALL;
    RESET ROLE;
    unlocked := pg_catalog.pg_advisory_unlock_all() IS NULL;
    IF pg_catalog.pg_my_temp_schema() OPERATOR(pg_catalog.<>) 0 THEN
        DISCARD TEMP;
    END IF;
    DISCARD SEQUENCES;
    SELECT e.n, e.safe INTO epoch, safe FROM auth.routine_epoch e;
    IF NOT FOUND THEN
        SELECT r.n, r.safe INTO epoch, safe FROM auth.routine_epoch_now() r;
    END IF;
    -- Never on its own: that call runs every check whatever it is given.
    IF NOT alone AND known IS NOT NULL AND known OPERATOR(pg_catalog.=) epoch AND safe THEN
        RETURN epoch;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_listening_channels()) THEN
        IF NOT alone THEN
            RAISE EXCEPTION 'the session listens: reset it on its own' USING ERRCODE = 'FX002';
        END IF;
        UNLISTEN *;
    END IF;
    EXECUTE 'CLOSE ALL';
    IF EXISTS (SELECT FROM pg_catalog.pg_prepared_statements p WHERE p.from_sql) THEN
        FOR name IN SELECT p.name FROM pg_catalog.pg_prepared_statements p WHERE p.from_sql LOOP
            EXECUTE pg_catalog.format('DEALLOCATE %I', name);
        END LOOP;
    END IF;
    IF safe THEN
        RETURN epoch;
    END IF;
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION auth.reset_session(boolean, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth.reset_session(boolean, bigint) TO {owner}, {readwrite}, {read};

RESET ROLE;

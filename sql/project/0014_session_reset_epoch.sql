-- auth.reset_session(alone, known) (issue 19): the reset of 0011, whose checks for state only a
-- utility statement can make (LISTEN, SQL-level PREPARE, DECLARE … WITH HOLD; ~10 µs of the
-- backend's ~17 per reset) are skipped when no such state can exist. The cheap parts (RESET ALL,
-- RESET ROLE, advisory locks, temporary objects, sequence state) always run: plain built-ins
-- called from a SELECT (set_config, pg_advisory_lock, nextval, SELECT … INTO TEMP) make those.
--
-- Why the checks may be skipped. Those three states are made only by the statements LISTEN,
-- PREPARE and DECLARE, at top level or from a routine (also a SQL-language one); PREPARE (after
-- DEALLOCATE) is also the only way SQL can replace a statement the server keeps prepared under a
-- name of its own, and the check deallocates every SQL-level one. No built-in runs them for a
-- caller: the built-ins that run a query text (query_to_xml and its kin, ts_stat, ts_rewrite)
-- use read-only SPI or a cursor, which refuse utility statements. So a session whose last use,
-- after a reset that left none of them, ran one statement that PostgreSQL answered with exactly
-- one CommandComplete tagged SELECT, INSERT, UPDATE, DELETE or MERGE (the server reads the tags
-- of the answer; it never trusts the request's text: a `--` comment ends at `\r` too, and
-- comments nest) while no routine of the project's own could be
-- called holds none of them. "No routine of the project's own": no pg_proc row made after
-- initdb (oid >= 16384) outside the server's schemas (auth, fluxbase_cdc, realtime: no project
-- role may create there) other than `internal`-language ones (range constructors: built-in C
-- code only). Extensions' functions count as the project's own (their C code could do anything).
--
-- The proof and its epoch. auth.routine_epoch holds `n`, bumped by every DDL that makes, alters,
-- moves or drops a routine, extension or language (event triggers below), and `safe`, the
-- check above recomputed by the same transaction after it holds the row's lock (so the last of
-- two concurrent DDL transactions sees the other's routines; under REPEATABLE READ the second
-- one fails with a serialization error instead; so two transactions that make routines wait for
-- each other until the first commits: routine DDL is rare and short). Both are read together and change together at
-- commit. A reset given `known` = the `n` an earlier reset of this session returned, which the
-- server passes only when the session's last use was such a single plain statement that
-- succeeded, skips the checks when `n` is still `known` and `safe` holds: no routine of the project's own
-- existed since that earlier reset read `n` (one made later would have changed `n`). It returns
-- `n` when `safe` holds (NULL otherwise), for the server to remember per connection; a caller
-- calling it learns only the epoch. The server's memory of `known` cannot be forged from SQL.
-- (Other utility statements answered with such a tag, CREATE TABLE AS, SELECT INTO, CREATE
-- MATERIALIZED VIEW, EXECUTE of a prepared plain statement, make none of the three either.)
-- The server passes `known` only to the reset in the statement's round trip; the reset on its
-- own (an identity change, a session that listens) gets NULL, and with `alone` the function
-- ignores `known` anyway: it always runs every check.
--
-- Sealed. The event triggers below only see DDL that runs after this migration commits; a
-- transaction that ran CREATE FUNCTION before then and commits later fires none, and a snapshot
-- taken before it commits does not see its routine, so no recompute of `safe` (this migration's
-- own, or a later trigger's) can be trusted while such a transaction may still be running. So
-- `safe` is false (the bump computes `sealed AND …`) until `sealed` is set: the server, after
-- this migration commits, lists the transactions of this database that hold an xid (pg_locks'
-- transactionid locks, prepared ones too; a transaction that ran DDL before the commit had an
-- xid by then; another database's transactions cannot make routines here), waits, a few seconds
-- at most, until none of them runs, then calls auth.seal_routine_epoch(). Every routine DDL after that either committed before the
-- seal's recompute (which takes the row's lock, then a new snapshot: it sees it) or fires a
-- trigger. If the wait times out, `safe` stays false (every reset runs its checks) and the next
-- start-up tries again (src/projects/provision.rs).
--
-- UNLOGGED: never in the WAL (the publication is FOR ALL TABLES). After a crash the table is
-- empty and every backend is new: the first reset or routine DDL fills it again
-- (auth.routine_epoch_now()).
-- Placeholders: {owner}, {readwrite}, {read}, {auth} (quoted identifiers).
SET LOCAL fluxbase.cdc_internal = 'on';
SET LOCAL ROLE {auth};

CREATE UNLOGGED TABLE IF NOT EXISTS auth.routine_epoch (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    n bigint NOT NULL,
    safe boolean NOT NULL,
    -- Every transaction older than this migration's commit has ended (see "Sealed" above).
    sealed boolean NOT NULL DEFAULT false
);
REVOKE ALL ON auth.routine_epoch FROM PUBLIC;
GRANT SELECT ON auth.routine_epoch TO {owner}, {readwrite}, {read};

-- True when no routine of the project's own exists (see above).
CREATE OR REPLACE FUNCTION auth.only_our_routines() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT NOT EXISTS (
        SELECT FROM pg_catalog.pg_proc p
        WHERE p.oid >= 16384
          AND p.prolang OPERATOR(pg_catalog.<>) 12
          AND p.pronamespace OPERATOR(pg_catalog.<>) ALL (ARRAY[
              'auth'::regnamespace, 'fluxbase_cdc'::regnamespace, 'realtime'::regnamespace]::oid[]))
$$;

-- Bumps the epoch and recomputes `safe` after the row's lock is held (a new snapshot: the
-- second statement sees every concurrent routine DDL that committed before it got the lock).
CREATE OR REPLACE FUNCTION auth.bump_routine_epoch() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO auth.routine_epoch AS e (id, n, safe) VALUES (true, 1, false)
        ON CONFLICT (id) DO UPDATE SET n = e.n + 1, safe = false;
    UPDATE auth.routine_epoch e SET safe = e.sealed AND auth.only_our_routines();
END
$$;

-- Called by the server once every transaction older than this migration's commit has ended
-- (see "Sealed" above): from then on `safe` may become true. The same two statements as the
-- bump (the recompute after the row's lock is held).
CREATE OR REPLACE FUNCTION auth.seal_routine_epoch() RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE auth.routine_epoch SET sealed = true;
    UPDATE auth.routine_epoch e SET safe = auth.only_our_routines();
    RETURN (SELECT e.safe FROM auth.routine_epoch e);
END
$$;
REVOKE ALL ON FUNCTION auth.only_our_routines(), auth.bump_routine_epoch(),
    auth.seal_routine_epoch() FROM PUBLIC;

-- The epoch and its proof, filling the table first when it is empty (after a crash).
CREATE OR REPLACE FUNCTION auth.routine_epoch_now(OUT n bigint, OUT safe boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_catalog.current_setting('transaction_read_only') = 'on' THEN
        -- Unknown for now (the reset then runs its checks); the next reset fills it.
        RETURN;
    END IF;
    -- Empty only after a crash (UNLOGGED), when every older transaction is gone: sealed.
    INSERT INTO auth.routine_epoch AS e (id, n, safe, sealed) VALUES (true, 1, false, true)
        ON CONFLICT (id) DO NOTHING;
    IF FOUND THEN
        UPDATE auth.routine_epoch SET safe = auth.only_our_routines();
    END IF;
    SELECT e.n, e.safe INTO n, safe FROM auth.routine_epoch e;
END
$$;
REVOKE ALL ON FUNCTION auth.routine_epoch_now() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth.routine_epoch_now() TO {owner}, {readwrite}, {read};

CREATE OR REPLACE FUNCTION auth.on_routine_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_event_trigger_ddl_commands() c
               WHERE c.classid OPERATOR(pg_catalog.=) ANY (ARRAY[
                   'pg_catalog.pg_proc'::regclass, 'pg_catalog.pg_extension'::regclass,
                   'pg_catalog.pg_language'::regclass]::oid[])) THEN
        PERFORM auth.bump_routine_epoch();
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION auth.on_routine_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_event_trigger_dropped_objects() d
               WHERE d.classid OPERATOR(pg_catalog.=) ANY (ARRAY[
                   'pg_catalog.pg_proc'::regclass, 'pg_catalog.pg_extension'::regclass,
                   'pg_catalog.pg_language'::regclass]::oid[])) THEN
        PERFORM auth.bump_routine_epoch();
    END IF;
END
$$;
REVOKE ALL ON FUNCTION auth.on_routine_ddl(), auth.on_routine_drop() FROM PUBLIC;

-- Every type, operator and function in the reset's body is qualified with pg_catalog (or auth),
-- declarations included: PL/pgSQL resolves a declaration's type name when it compiles the
-- function, on its first call in a session, with the caller's search_path (pg_temp first for
-- types), before RESET ALL. An unqualified `text` there once resolved to a caller's domain
-- `ev.text` whose CHECK ran set_config after RESET ALL (when a prepared statement's name was
-- assigned to the variable) and the next request inherited the caller's settings. No SET clause
-- on the function: its saved values and RESET ALL inside it interact; qualification needs none.
CREATE OR REPLACE FUNCTION auth.reset_session(alone pg_catalog.bool, known pg_catalog.int8)
RETURNS pg_catalog.int8
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    name pg_catalog.text;
    unlocked pg_catalog.bool;
    epoch pg_catalog.int8;
    safe pg_catalog.bool;
BEGIN
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

-- The one-argument reset of 0011 (kept for servers of the previous version during an upgrade)
-- with the same qualified declaration.
CREATE OR REPLACE FUNCTION auth.reset_session(alone pg_catalog.bool) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    name pg_catalog.text;
    unlocked pg_catalog.bool;
BEGIN
    RESET ALL;
    RESET ROLE;
    unlocked := pg_catalog.pg_advisory_unlock_all() IS NULL;
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
    IF pg_catalog.pg_my_temp_schema() OPERATOR(pg_catalog.<>) 0 THEN
        DISCARD TEMP;
    END IF;
    DISCARD SEQUENCES;
END
$$;
REVOKE ALL ON FUNCTION auth.reset_session(boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth.reset_session(boolean) TO {owner}, {readwrite}, {read};

REVOKE ALL ON FUNCTION auth.reset_session(boolean, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth.reset_session(boolean, bigint) TO {owner}, {readwrite}, {read};

RESET ROLE;

-- Event triggers need the admin role (as 0002's); their functions belong to {auth}.
DROP EVENT TRIGGER IF EXISTS fluxbase_routines;
CREATE EVENT TRIGGER fluxbase_routines ON ddl_command_end
    EXECUTE FUNCTION auth.on_routine_ddl();
DROP EVENT TRIGGER IF EXISTS fluxbase_routines_drop;
CREATE EVENT TRIGGER fluxbase_routines_drop ON sql_drop
    EXECUTE FUNCTION auth.on_routine_drop();

-- Not sealed: `safe` stays false until the server seals the epoch (see "Sealed" above).
SELECT auth.bump_routine_epoch();

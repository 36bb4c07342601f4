-- What SQL sent with any key may not do (issue 13). Run by the server's admin role inside the
-- project database; safe to run again. Placeholders: {owner}, {readwrite}, {read}, {auth} (quoted identifiers).
--
--  * Logins: the project roles' passwords are expired ('-infinity'). PostgreSQL lets every role
--    change its own password, never its VALID UNTIL, so a password a caller sets opens no login.
--    The server opens a login for the moment it connects (see src/projects.rs, RoleLogin).
--  * Change-stream messages: pg_logical_emit_message is closed to PUBLIC, and the server's own
--    emitters (fluxbase_cdc.emit, behind fluxbase_cdc.announce and realtime.broadcast) tag each
--    message with an HMAC under a per-project key only the admin role reads (a large object,
--    installed by the server with this migration). The change stream drops fluxbase.* messages
--    without a valid tag.
--  * fluxbase.cdc_internal: honoured only in the admin role's own sessions (migrations). The
--    event trigger's own ALTER TABLE … REPLICA IDENTITY FULL is marked in an unlogged table the
--    project roles cannot reach, so no setting a caller can make silences a DDL event. Tables
--    made inside another command (CREATE SCHEMA … CREATE TABLE) get REPLICA IDENTITY FULL too.
--  * Other sessions: the activity, lock and signal functions (and the views over them) are
--    closed to PUBLIC: a caller cannot read another caller's statement text nor cancel or
--    terminate its backend, even when both log in as the same role. Schema auth's owner keeps
--    pg_stat_get_activity (auth.set_uid forgets the rows of gone backends).
SET LOCAL fluxbase.cdc_internal = 'on';

ALTER ROLE {owner} VALID UNTIL '-infinity';
ALTER ROLE {readwrite} VALID UNTIL '-infinity';
ALTER ROLE {read} VALID UNTIL '-infinity';

DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = 'pg_catalog'::regnamespace
               AND (p.proname IN ('pg_logical_emit_message', 'pg_stat_get_activity',
                                  'pg_stat_get_progress_info', 'pg_lock_status', 'pg_blocking_pids',
                                  'pg_safe_snapshot_blocking_pids',
                                  'pg_isolation_test_session_is_blocked', 'pg_cancel_backend',
                                  'pg_terminate_backend')
                    OR p.proname LIKE 'pg\_stat\_get\_backend\_%') LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END $$;
REVOKE SELECT ON pg_catalog.pg_stat_activity, pg_catalog.pg_locks FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) TO {auth};

-- fluxbase_cdc.message_key() (the padded HMAC keys, inner || outer) is created by the server
-- right after this script, in the same transaction, once the key is installed.
CREATE OR REPLACE FUNCTION fluxbase_cdc.emit(prefix text, body text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    key bytea := fluxbase_cdc.message_key();
    content bytea := convert_to(body, 'UTF8');
    tag text;
BEGIN
    tag := encode(sha256(substr(key, 65, 64) || sha256(substr(key, 1, 64)
               || convert_to(prefix, 'UTF8') || '\x0a'::bytea || content)), 'hex');
    PERFORM pg_logical_emit_message(true, prefix, convert_to(tag, 'UTF8') || content);
END
$$;
REVOKE ALL ON FUNCTION fluxbase_cdc.emit(text, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION fluxbase_cdc.announce(command text, object_type text, schema_name text, identity text)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT fluxbase_cdc.emit('fluxbase.ddl', json_build_object(
        'command', command, 'objectType', object_type, 'schema', schema_name, 'object', identity)::text)
$$;

CREATE OR REPLACE FUNCTION realtime.broadcast(event text, payload jsonb DEFAULT '{}'::jsonb)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT fluxbase_cdc.emit('fluxbase.broadcast',
        json_build_object('event', event, 'payload', payload)::text)
$$;

-- Backends inside the event trigger's own ALTER TABLE (UNLOGGED: never in the WAL, so never
-- published either).
CREATE UNLOGGED TABLE IF NOT EXISTS fluxbase_cdc.internal (
    pid integer PRIMARY KEY,
    xid xid8 NOT NULL
);
REVOKE ALL ON fluxbase_cdc.internal FROM PUBLIC;

-- True when the current DDL must not be announced: the admin role's own session asked for it
-- (session_user is the function's owner), or the event trigger's own ALTER TABLE is running.
CREATE OR REPLACE FUNCTION fluxbase_cdc.quiet() RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT (session_user = current_user
            AND coalesce(current_setting('fluxbase.cdc_internal', true), '') = 'on')
        OR EXISTS (SELECT 1 FROM fluxbase_cdc.internal
                   WHERE pid = pg_backend_pid() AND xid = pg_current_xact_id())
$$;
REVOKE ALL ON FUNCTION fluxbase_cdc.quiet() FROM PUBLIC;

CREATE OR REPLACE FUNCTION fluxbase_cdc.on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    cmd record;
BEGIN
    IF fluxbase_cdc.quiet() THEN
        RETURN;
    END IF;
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF cmd.in_extension THEN
            CONTINUE;
        END IF;
        -- Every new table, also one made inside another command (CREATE SCHEMA … CREATE TABLE).
        IF cmd.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
           AND cmd.object_type = 'table' THEN
            INSERT INTO fluxbase_cdc.internal (pid, xid) VALUES (pg_backend_pid(), pg_current_xact_id())
                ON CONFLICT (pid) DO UPDATE SET xid = EXCLUDED.xid;
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', cmd.object_identity);
            DELETE FROM fluxbase_cdc.internal WHERE pid = pg_backend_pid();
        END IF;
        -- Announced: only the command itself, not what it did along the way (the index of a
        -- primary key, the sequence of a serial column).
        IF cmd.command_tag = tg_tag THEN
            PERFORM fluxbase_cdc.announce(cmd.command_tag, cmd.object_type, cmd.schema_name, cmd.object_identity);
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION fluxbase_cdc.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    obj record;
BEGIN
    IF tg_tag NOT LIKE 'DROP %' OR fluxbase_cdc.quiet() THEN
        RETURN;
    END IF;
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE original LOOP
        PERFORM fluxbase_cdc.announce(tg_tag, obj.object_type, obj.schema_name, obj.object_identity);
    END LOOP;
END $$;

-- Change capture for a project database. Run by the server's admin role (a superuser on the
-- embedded cluster: publications FOR ALL TABLES and event triggers need one).
--
--  * publication fluxbase_changes: every table, every row operation, partitions as their root;
--  * event triggers that announce each DDL as a transactional logical decoding message
--    (prefix 'fluxbase.ddl'), so schema changes reach the change stream in commit order,
--    between the row changes of the same transaction;
--  * new tables get REPLICA IDENTITY FULL, so UPDATE and DELETE events carry the old row.
-- The project's own roles gain nothing: schema fluxbase_cdc is closed to them.
CREATE SCHEMA fluxbase_cdc;
REVOKE ALL ON SCHEMA fluxbase_cdc FROM PUBLIC;

CREATE PUBLICATION fluxbase_changes FOR ALL TABLES
    WITH (publish = 'insert, update, delete, truncate', publish_via_partition_root = true);

CREATE FUNCTION fluxbase_cdc.announce(command text, object_type text, schema_name text, identity text)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT pg_logical_emit_message(true, 'fluxbase.ddl', json_build_object(
        'command', command, 'objectType', object_type, 'schema', schema_name, 'object', identity)::text)::text::void
$$;
REVOKE ALL ON FUNCTION fluxbase_cdc.announce(text, text, text, text) FROM PUBLIC;

CREATE FUNCTION fluxbase_cdc.on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    cmd record;
BEGIN
    IF current_setting('fluxbase.cdc_internal', true) = 'on' THEN
        RETURN;
    END IF;
    -- Only the command itself, not what it did along the way (the index of a primary key,
    -- the sequence of a serial column).
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE command_tag = tg_tag LOOP
        IF cmd.in_extension THEN
            CONTINUE;
        END IF;
        IF cmd.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
           AND cmd.object_type = 'table' THEN
            PERFORM set_config('fluxbase.cdc_internal', 'on', true);
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', cmd.object_identity);
            PERFORM set_config('fluxbase.cdc_internal', 'off', true);
        END IF;
        PERFORM fluxbase_cdc.announce(cmd.command_tag, cmd.object_type, cmd.schema_name, cmd.object_identity);
    END LOOP;
END $$;

CREATE FUNCTION fluxbase_cdc.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    obj record;
BEGIN
    IF current_setting('fluxbase.cdc_internal', true) = 'on' OR tg_tag NOT LIKE 'DROP %' THEN
        RETURN;
    END IF;
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE original LOOP
        PERFORM fluxbase_cdc.announce(tg_tag, obj.object_type, obj.schema_name, obj.object_identity);
    END LOOP;
END $$;

CREATE EVENT TRIGGER fluxbase_ddl ON ddl_command_end
    EXECUTE FUNCTION fluxbase_cdc.on_ddl_command_end();
CREATE EVENT TRIGGER fluxbase_drop ON sql_drop
    EXECUTE FUNCTION fluxbase_cdc.on_sql_drop();

-- Tables that existed before change capture was set up.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.oid::regclass AS name FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'fluxbase_cdc')
               AND n.nspname NOT LIKE 'pg_toast%' AND c.relreplident = 'd' LOOP
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', t.name);
    END LOOP;
END $$;

-- Red team rt16 L1: the owner role installed trusted extensions into the server's schemas
-- (`CREATE EXTENSION pg_trgm SCHEMA pg_catalog`, `citext SCHEMA auth`, `ltree SCHEMA
-- fluxbase_cdc`, `tablefunc SCHEMA realtime`): a trusted extension's script runs as the
-- superuser, so the role's missing CREATE on those schemas did not stop it. No escalation was
-- found, but the server's own SQL trusts what `pg_catalog` (and its schemas) hold: a project
-- puts its objects in schemas of its own. A DDL command of a project role that leaves an object,
-- or an extension, in one of the server's schemas is refused (42501).
SET LOCAL fluxbase.cdc_internal = 'on';
CREATE OR REPLACE FUNCTION fluxbase_cdc.guard_server_schemas() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    server_schemas text[] := ARRAY['pg_catalog', 'information_schema', 'auth', 'realtime',
                                   'fluxbase_cdc'];
    found text;
BEGIN
    -- The server's own sessions (a superuser) change these schemas in its migrations.
    IF coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = session_user),
                false) THEN
        RETURN;
    END IF;
    FOR cmd IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands() LOOP
        IF cmd.schema_name = ANY (server_schemas) THEN
            RAISE EXCEPTION 'a project''s objects go in its own schemas, not in %', cmd.schema_name
                USING ERRCODE = '42501';
        END IF;
    END LOOP;
    -- An extension moved there (ALTER EXTENSION … SET SCHEMA reports the extension alone).
    SELECT e.extname INTO found
    FROM pg_catalog.pg_extension e
    JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    JOIN pg_catalog.pg_roles o ON o.oid = e.extowner
    WHERE n.nspname = ANY (server_schemas) AND NOT o.rolsuper
    LIMIT 1;
    IF found IS NOT NULL THEN
        RAISE EXCEPTION 'a project''s extensions go in its own schemas (extension %)', found
            USING ERRCODE = '42501';
    END IF;
END $$;
REVOKE ALL ON FUNCTION fluxbase_cdc.guard_server_schemas() FROM PUBLIC;
DROP EVENT TRIGGER IF EXISTS fluxbase_server_schemas;
CREATE EVENT TRIGGER fluxbase_server_schemas ON ddl_command_end
    EXECUTE FUNCTION fluxbase_cdc.guard_server_schemas();

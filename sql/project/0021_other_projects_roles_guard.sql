-- Red team rt17 and the review after it: a project's owner (or a role it gave GRANT OPTION to)
-- granted privileges on its objects to another project's roles, named them in a policy or in
-- default privileges (role names are visible to every project). Harmless to that project (it
-- cannot connect here), but it kept that project's roles from being dropped: its deletion
-- revokes what names them with DROP OWNED, which removes only grants made by an object's owner,
-- not those of a grantee holding GRANT OPTION. A project role's GRANT, policy or default
-- privileges that leave this database naming a role of another project (`fx_<16 hex>_…` not of
-- this database) are refused (42501). Grants, policies and default privileges name this
-- project's roles, PUBLIC, or roles that are no project's.
SET LOCAL fluxbase.cdc_internal = 'on';
CREATE OR REPLACE FUNCTION fluxbase_cdc.guard_other_projects_roles() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found text;
BEGIN
    -- The server's own sessions (a superuser) grant to this project's roles only.
    IF coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = session_user),
                false) THEN
        RETURN;
    END IF;
    SELECT r.rolname INTO found
    FROM pg_catalog.pg_shdepend s
    JOIN pg_catalog.pg_roles r ON r.oid = s.refobjid
    WHERE s.dbid = (SELECT d.oid FROM pg_catalog.pg_database d
                    WHERE d.datname = pg_catalog.current_database())
      AND s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
      AND r.rolname OPERATOR(pg_catalog.~) '^fx_[0-9a-f]{16}_'
      AND NOT pg_catalog.starts_with(r.rolname,
                                     pg_catalog.current_database() OPERATOR(pg_catalog.||) '_')
    LIMIT 1;
    IF found IS NOT NULL THEN
        RAISE EXCEPTION 'role % is another project''s: grants, policies and default privileges may name this project''s roles only', found
            USING ERRCODE = '42501';
    END IF;
END $$;
REVOKE ALL ON FUNCTION fluxbase_cdc.guard_other_projects_roles() FROM PUBLIC;
DROP EVENT TRIGGER IF EXISTS fluxbase_other_projects_roles;
CREATE EVENT TRIGGER fluxbase_other_projects_roles ON ddl_command_end
    WHEN TAG IN ('GRANT', 'CREATE POLICY', 'ALTER POLICY', 'ALTER DEFAULT PRIVILEGES')
    EXECUTE FUNCTION fluxbase_cdc.guard_other_projects_roles();

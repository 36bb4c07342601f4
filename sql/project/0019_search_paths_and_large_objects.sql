-- Red team rt15.
--
-- 1. Functions of the server's whose search_path was `pg_catalog` alone search the session's
--    temporary schema FIRST for types and relations (0008 mended the SECURITY DEFINER ones it
--    named). `fluxbase_cdc.message_key()` was left: it runs inside the definer functions of the
--    change capture, as the superuser, on a tenant's own session, and its `<oid>::oid` found
--    a tenant's `pg_temp.oid` type (made under another name, renamed after a COMMIT): the
--    owner role's cast function ran as the superuser (COPY … TO PROGRAM, other tenants' files).
--    Every function the server's role owns gets `pg_temp` named last.
--
-- 2. The large-object functions wrote outside every bound the SQL API sets: a read key ("SELECT
--    only") stored ~100 MB a request that outlived it (`lo_from_bytea`), and filled the
--    cluster's one shared lock table with `lo_create` in subtransactions (one lock each, held
--    to the statement's end), so that every tenant's DDL and new projects failed with 53200
--    "out of shared memory". Large objects are not part of the product (files go to storage):
--    the functions are revoked from PUBLIC in the project's database. The server's own key
--    (fluxbase_cdc.message_key) is read by its owner, the superuser.
--
-- Only a superuser may change privileges on catalog objects: on a cluster where the server's
-- role is none (a managed one), they stay as the cluster has them (docs/security.md).
SET LOCAL fluxbase.cdc_internal = 'on';
DO $fx$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             WHERE p.proowner = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user)
               AND p.pronamespace <> 'pg_catalog'::pg_catalog.regnamespace
               AND 'search_path=pg_catalog' = ANY (p.proconfig) LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RETURN;
    END IF;
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace
               AND p.proname IN ('lo_create', 'lo_creat', 'lo_from_bytea', 'lo_open', 'lo_close',
                                 'loread', 'lowrite', 'lo_lseek', 'lo_lseek64', 'lo_tell',
                                 'lo_tell64', 'lo_truncate', 'lo_truncate64', 'lo_unlink',
                                 'lo_put', 'lo_get', 'lo_import', 'lo_export') LOOP
        EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$fx$;

-- Cluster-wide resources and other tenants' activity are not a project's business.
--
-- Advisory locks live in the cluster's one shared lock table (max_locks_per_transaction ×
-- (max_connections + max_prepared_transactions) entries, ~60,000 on the embedded cluster). Any
-- project role could fill it (`SELECT pg_advisory_lock(i) FROM generate_series(1, 60000) i`, the
-- session-level locks held while the connection idled in the pool): every tenant's writes, DDL
-- and the server's own control-database logins then failed with 53200 "out of shared memory".
-- The functions that take advisory locks are revoked from PUBLIC in the project's database; the
-- unlock functions stay (the session reset calls pg_advisory_unlock_all()).
--
-- `pg_stat_database` (and the `pg_stat_get_db_*` functions behind it, callable with any
-- database's oid) showed every project database's commits, rows inserted/updated/deleted and
-- blocks read: a side channel on other tenants' activity, as the slots' LSNs were (0009).
--
-- Only a superuser may change privileges on catalog objects: on a cluster where the server's
-- role is none (a managed one), they stay as the cluster has them (docs/security.md).
SET LOCAL fluxbase.cdc_internal = 'on';
DO $fx$
DECLARE
    f regprocedure;
    v text;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RETURN;
    END IF;
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'pg_catalog'::regnamespace
               AND (p.proname IN ('pg_advisory_lock', 'pg_advisory_lock_shared',
                                  'pg_advisory_xact_lock', 'pg_advisory_xact_lock_shared',
                                  'pg_try_advisory_lock', 'pg_try_advisory_lock_shared',
                                  'pg_try_advisory_xact_lock',
                                  'pg_try_advisory_xact_lock_shared')
                    OR p.proname LIKE 'pg\_stat\_get\_db\_%') LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    FOREACH v IN ARRAY ARRAY['pg_stat_database', 'pg_stat_database_conflicts'] LOOP
        IF to_regclass('pg_catalog.' || v) IS NOT NULL THEN
            EXECUTE format('REVOKE SELECT ON pg_catalog.%I FROM PUBLIC', v);
        END IF;
    END LOOP;
END $fx$;

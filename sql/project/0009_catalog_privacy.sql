-- What other tenants of the cluster do is not a project's business: every project role could
-- read `pg_replication_slots` (each project's slot, `fx_<id>`, its confirmed LSN and the pid
-- streaming it: a side channel on other tenants' write activity) and the walsenders in
-- `pg_stat_replication`. These views are per database: revoked here from PUBLIC, in this
-- project's database; the server's own role reads them as a superuser or from the control
-- database. Only a superuser may change privileges on catalog views: on a cluster where the
-- server's role is none (a managed one), they stay as the cluster has them (`fluxbase doctor`
-- can't change that either; docs/security.md says so).
SET LOCAL fluxbase.cdc_internal = 'on';
DO $fx$
DECLARE
    v text;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RETURN;
    END IF;
    FOREACH v IN ARRAY ARRAY['pg_replication_slots', 'pg_stat_replication',
                             'pg_stat_replication_slots', 'pg_stat_wal_receiver',
                             'pg_stat_subscription', 'pg_stat_subscription_stats'] LOOP
        IF to_regclass('pg_catalog.' || v) IS NOT NULL THEN
            EXECUTE format('REVOKE SELECT ON pg_catalog.%I FROM PUBLIC', v);
        END IF;
    END LOOP;
END $fx$;

-- SECURITY DEFINER functions whose search_path was `pg_catalog` alone: PostgreSQL then searches
-- the session's temporary schema FIRST for relations, so a project role with TEMPORARY could shadow
-- a catalog (e.g. `CREATE TEMP TABLE pg_trigger (...)`) and steer what the function decides (it
-- let the owner rename, then drop, the partition-truncate triggers). With `pg_temp` named last it
-- is searched last (and never for functions or operators).
SET LOCAL fluxbase.cdc_internal = 'on';
ALTER FUNCTION fluxbase_cdc.announce(text, text, text, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION fluxbase_cdc.on_ddl_command_end() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION fluxbase_cdc.on_sql_drop() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION realtime.broadcast(text, jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION fluxbase_cdc.on_partition_ddl() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION fluxbase_cdc.on_partition_drop() SET search_path = pg_catalog, pg_temp;

-- A partition's TRUNCATE reaches the change stream (issue 14). Run by the server's admin role
-- inside the project database; safe to run again. Placeholders: none.
--
-- The publication sends row changes of partitions as their root (publish_via_partition_root),
-- and pgoutput then sends no TRUNCATE for a partition (pgoutput_truncate skips partitions
-- published as their root); a TRUNCATE of the root itself is sent. So every partition (and
-- every partitioned table) gets two statement triggers:
--
--  * BEFORE TRUNCATE (fluxbase_cdc.truncate_noted): notes the relation among those the running
--    statement truncates. All BEFORE triggers of a statement fire before any of its AFTER
--    triggers, so when the first AFTER trigger fires the list is complete.
--  * AFTER TRUNCATE (fluxbase_cdc.truncate_announced): for a partition none of whose ancestors
--    the same statement truncated, emits a tagged transactional message 'fluxbase.truncate'
--    (fluxbase_cdc.emit, 0005) naming the partition and its root. A partition whose ancestor
--    was truncated too is covered by that ancestor's event (the root's from pgoutput, or the
--    topmost truncated partition's from this trigger), so each statement yields one event per
--    truncated subtree, in the order of the statement's other changes.
--
-- The list lives in fluxbase_cdc.truncating (UNLOGGED: never in the WAL, never published),
-- keyed by backend and trigger depth (a TRUNCATE inside a trigger is a statement of its own)
-- and tied to the transaction; the project's roles cannot reach it, so no setting a caller can
-- make silences or invents an event. The event trigger fluxbase_partitions gives new and
-- attached partitions the triggers, re-enables them after an ALTER TABLE … DISABLE TRIGGER,
-- and refuses to drop or rename them. A detached partition keeps them; they do nothing for a
-- table that is no partition (its TRUNCATE is published as itself).
SET LOCAL fluxbase.cdc_internal = 'on';

CREATE UNLOGGED TABLE IF NOT EXISTS fluxbase_cdc.truncating (
    pid integer NOT NULL,
    depth integer NOT NULL,
    xid xid8 NOT NULL,
    -- True while the statement's BEFORE triggers run; the first AFTER trigger ends the list.
    collecting boolean NOT NULL,
    relids oid[] NOT NULL,
    PRIMARY KEY (pid, depth)
);
REVOKE ALL ON fluxbase_cdc.truncating FROM PUBLIC;

CREATE OR REPLACE FUNCTION fluxbase_cdc.truncate_noted() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    x xid8 := pg_current_xact_id();
BEGIN
    INSERT INTO fluxbase_cdc.truncating AS t (pid, depth, xid, collecting, relids)
    VALUES (pg_backend_pid(), pg_trigger_depth(), x, true, ARRAY[TG_RELID])
    ON CONFLICT (pid, depth) DO UPDATE SET
        relids = CASE WHEN t.xid = x AND t.collecting THEN t.relids || TG_RELID
                      ELSE ARRAY[TG_RELID] END,
        xid = x,
        collecting = true;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION fluxbase_cdc.truncate_noted() FROM PUBLIC;

CREATE OR REPLACE FUNCTION fluxbase_cdc.truncate_announced() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    truncated oid[];
    root oid;
    root_schema name;
    root_name name;
BEGIN
    UPDATE fluxbase_cdc.truncating SET collecting = false
    WHERE pid = pg_backend_pid() AND depth = pg_trigger_depth() AND xid = pg_current_xact_id()
    RETURNING relids INTO truncated;
    IF NOT coalesce((SELECT relispartition FROM pg_class WHERE oid = TG_RELID), false) THEN
        RETURN NULL;
    END IF;
    -- An ancestor truncated by the same statement speaks for this partition. (Without a list,
    -- say because the BEFORE trigger was missing, the partition is announced: never lost.)
    IF EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) a
               WHERE a.relid <> TG_RELID AND a.relid = ANY (truncated)) THEN
        RETURN NULL;
    END IF;
    root := pg_partition_root(TG_RELID);
    SELECT n.nspname, c.relname INTO root_schema, root_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = root;
    PERFORM fluxbase_cdc.emit('fluxbase.truncate', json_build_object(
        'schema', root_schema, 'table', root_name,
        'partition', json_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME))::text);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION fluxbase_cdc.truncate_announced() FROM PUBLIC;

-- Gives every partition and partitioned table of rel's partition tree the two triggers
-- (enabled). Nothing for a table outside any partition tree.
CREATE OR REPLACE FUNCTION fluxbase_cdc.watch_truncates(rel oid) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t record;
    fn record;
    trg record;
    ddl text;
    marked boolean;
BEGIN
    FOR t IN SELECT tree.relid FROM pg_partition_tree(pg_partition_root(rel)) tree
             JOIN pg_class c ON c.oid = tree.relid
             WHERE c.relkind IN ('r', 'p') AND (c.relispartition OR c.relkind = 'p') LOOP
        FOR fn IN SELECT * FROM (VALUES
                    ('fluxbase_truncate_noted', 'BEFORE', 'fluxbase_cdc.truncate_noted()'::regprocedure),
                    ('fluxbase_truncate_announced', 'AFTER', 'fluxbase_cdc.truncate_announced()'::regprocedure))
                    AS f(name, timing, proc) LOOP
            SELECT tgname, tgenabled INTO trg FROM pg_trigger
            WHERE tgrelid = t.relid AND tgfoid = fn.proc;
            IF NOT FOUND THEN
                ddl := format('CREATE TRIGGER %I %s TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                              fn.name, fn.timing, t.relid::regclass, fn.proc::oid::regproc);
            ELSIF trg.tgenabled <> 'O' THEN
                ddl := format('ALTER TABLE %s ENABLE TRIGGER %I', t.relid::regclass, trg.tgname);
            ELSE
                CONTINUE;
            END IF;
            -- Not announced (fluxbase_cdc.quiet(), 0005): the project did not run it. When the
            -- caller already marked this backend (the event trigger's own ALTER TABLE), the
            -- mark stays for the caller to remove.
            marked := EXISTS (SELECT 1 FROM fluxbase_cdc.internal
                              WHERE pid = pg_backend_pid() AND xid = pg_current_xact_id());
            IF NOT marked THEN
                INSERT INTO fluxbase_cdc.internal (pid, xid) VALUES (pg_backend_pid(), pg_current_xact_id())
                    ON CONFLICT (pid) DO UPDATE SET xid = EXCLUDED.xid;
            END IF;
            EXECUTE ddl;
            IF NOT marked THEN
                DELETE FROM fluxbase_cdc.internal WHERE pid = pg_backend_pid();
            END IF;
        END LOOP;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION fluxbase_cdc.watch_truncates(oid) FROM PUBLIC;

CREATE OR REPLACE FUNCTION fluxbase_cdc.on_partition_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    cmd record;
BEGIN
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF cmd.in_extension THEN
            CONTINUE;
        END IF;
        IF cmd.object_type = 'table' AND cmd.command_tag IN ('CREATE TABLE', 'ALTER TABLE') THEN
            PERFORM fluxbase_cdc.watch_truncates(cmd.objid);
        ELSIF cmd.object_type = 'trigger' AND cmd.command_tag = 'ALTER TRIGGER'
              AND EXISTS (SELECT 1 FROM pg_trigger WHERE oid = cmd.objid
                          AND tgfoid IN ('fluxbase_cdc.truncate_noted()'::regprocedure,
                                         'fluxbase_cdc.truncate_announced()'::regprocedure)) THEN
            RAISE EXCEPTION 'trigger % belongs to the change capture of this project', cmd.object_identity
                USING ERRCODE = '42501';
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION fluxbase_cdc.on_partition_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    obj record;
BEGIN
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects()
               WHERE original AND object_type = 'trigger'
                 AND address_names[3] IN ('fluxbase_truncate_noted', 'fluxbase_truncate_announced') LOOP
        -- The table is still there: the trigger was dropped on its own.
        IF to_regclass(format('%I.%I', obj.address_names[1], obj.address_names[2])) IS NOT NULL THEN
            RAISE EXCEPTION 'trigger % belongs to the change capture of this project', obj.object_identity
                USING ERRCODE = '42501';
        END IF;
    END LOOP;
END $$;

DROP EVENT TRIGGER IF EXISTS fluxbase_partitions;
CREATE EVENT TRIGGER fluxbase_partitions ON ddl_command_end
    EXECUTE FUNCTION fluxbase_cdc.on_partition_ddl();
DROP EVENT TRIGGER IF EXISTS fluxbase_partitions_drop;
CREATE EVENT TRIGGER fluxbase_partitions_drop ON sql_drop
    EXECUTE FUNCTION fluxbase_cdc.on_partition_drop();

-- Partition trees that existed before.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.oid FROM pg_class c
             WHERE c.relkind = 'p' AND NOT c.relispartition
               AND c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace) LOOP
        PERFORM fluxbase_cdc.watch_truncates(t.oid);
    END LOOP;
END $$;

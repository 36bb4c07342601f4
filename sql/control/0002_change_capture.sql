-- The replication slot each project's change stream reads from, once it has been created.
-- A project whose slot is recorded here but missing from the cluster is a loud error: changes
-- may have been lost, and the stream does not silently start over.
ALTER TABLE fluxbase.projects ADD COLUMN cdc_slot text;

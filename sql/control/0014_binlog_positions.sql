-- Where each MySQL project's change stream resumes in the server's binary log (issue 20): the
-- end of the last transaction every durable subscriber of the project has stored (the webhook
-- outbox, the realtime history), or a later transaction boundary when the project was idle and
-- everything was acknowledged. Advanced only by the stream (src/cdc/binlog/position.rs); a
-- restart reads from here and repeats what follows with the same event ids. A position whose
-- file the server has purged stops the stream with state `slot_lost`: it is never skipped.
CREATE TABLE fluxbase.binlog_positions (
    project_id    text PRIMARY KEY REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    -- The binary log file (`binlog.000042`) and the byte offset of the next event to read.
    binlog_file   text NOT NULL,
    binlog_offset bigint NOT NULL CHECK (binlog_offset >= 4 AND binlog_offset < 4294967296),
    -- The GTID of the last transaction of the project at or before the position, when the
    -- server logs GTIDs (MariaDB `domain-server-sequence`, MySQL `uuid:n`); informative.
    gtid          text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

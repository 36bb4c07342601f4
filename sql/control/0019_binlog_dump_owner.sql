-- The binlog dump connection a MySQL project's stream opened last, by whichever process or
-- cluster node opened it (issue 20): its connection id on the MySQL server and the start time
-- (Unix seconds) of the server run that gave the id. A stream starting in another process (a
-- restart, a new leader after a failover) ends that dump itself (`KILL CONNECTION`, after
-- checking it is still a `Binlog Dump` thread of the replication account in the same server
-- run: ids start over when the server restarts) instead of waiting ~0.1 s for the server to
-- end it (src/cdc/binlog/mod.rs, `Dumps`). Both NULL until a dump was opened.
ALTER TABLE fluxbase.binlog_positions
    ADD COLUMN dump_connection bigint CHECK (dump_connection >= 0 AND dump_connection < 4294967296),
    ADD COLUMN dump_server_start bigint;

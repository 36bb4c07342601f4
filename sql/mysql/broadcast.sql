-- realtime broadcasts on a MySQL project (issue 20): `CALL fluxbase_realtime_broadcast(event,
-- payload)` is MySQL's `realtime.broadcast(event, payload)`. The procedure writes a row to
-- `fluxbase_broadcasts` and deletes it in the same transaction: the table stays empty, and the
-- binlog carries the row inside the caller's transaction, so the project's binlog stream
-- (src/cdc/binlog/decode.rs) turns it into a broadcast when, and only when, that transaction
-- commits (nothing of a rolled-back one reaches the log). An InnoDB table rather than
-- BLACKHOLE: a non-transactional engine inside a transaction is refused by MySQL servers with
-- enforce_gtid_consistency and logged outside the transaction by some, and BLACKHOLE is a
-- plugin that may be off.
--
-- Security (red team, issue 20): the procedure runs with the CALLER's rights (SQL SECURITY
-- INVOKER) and its definer is the project's own admin account, never the server's account:
-- whatever the project's admin puts in its database under the name `fluxbase_broadcasts` (a
-- view WITH CHECK OPTION, a trigger, a generated column) runs at most as a project account,
-- and an `ALTER PROCEDURE … SQL SECURITY DEFINER` by that admin gives nothing more than the
-- admin's own rights. Names are fully qualified. The readwrite account gets DELETE on this
-- one table (the procedure deletes its row); read gets nothing (it cannot broadcast).
--
-- Run by the provisioning account after the accounts exist, at every provisioning
-- (idempotent): src/cdc/binlog/mod.rs `provision_broadcast` first drops a view, or a table of
-- another shape, that took the name, then runs the statements one by one (split at the marker
-- lines), with {db} the project database, {admin} and {readwrite} the accounts ('user'@'host').
CREATE TABLE IF NOT EXISTS `{db}`.fluxbase_broadcasts (
    id      BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
    event   VARCHAR(255) NOT NULL,
    payload LONGTEXT NOT NULL
) ENGINE = InnoDB
-- next statement
DROP PROCEDURE IF EXISTS `{db}`.fluxbase_realtime_broadcast
-- next statement
CREATE DEFINER = {admin} PROCEDURE `{db}`.fluxbase_realtime_broadcast(IN p_event VARCHAR(255), IN p_payload LONGTEXT)
    MODIFIES SQL DATA
    SQL SECURITY INVOKER
BEGIN
    IF p_event IS NULL THEN
        SIGNAL SQLSTATE '22004'
            SET MESSAGE_TEXT = 'fluxbase_realtime_broadcast: the event name is NULL';
    END IF;
    IF p_payload IS NULL THEN
        SET p_payload = '{}';
    END IF;
    IF NOT JSON_VALID(p_payload) THEN
        SIGNAL SQLSTATE '22032'
            SET MESSAGE_TEXT = 'fluxbase_realtime_broadcast: the payload is not JSON';
    END IF;
    INSERT INTO `{db}`.fluxbase_broadcasts (event, payload) VALUES (p_event, p_payload);
    DELETE FROM `{db}`.fluxbase_broadcasts WHERE id = LAST_INSERT_ID();
END
-- next statement
GRANT DELETE ON `{db}`.fluxbase_broadcasts TO {readwrite}
-- next statement
GRANT EXECUTE ON PROCEDURE `{db}`.fluxbase_realtime_broadcast TO {readwrite}

-- Session 25 (issue 19): routine DDL waits for the SQL requests in flight, so that a reset's
-- proof covers the statement that runs after it in the same transaction.
--
-- Why. The pipelined reset reads the epoch (auth.routine_epoch) and then the request's statement
-- runs in the same transaction, under snapshots of its own (READ COMMITTED). A routine committed
-- between the two was callable by the statement although the reset's read did not see it. That
-- was harmless while the proof was only checked by the *next* reset inside the function (the
-- routine moved the epoch, so the next reset ran every check); it is not when the server uses
-- the proof *before* anything runs: since this migration the server binds the reset kept under
-- the name `fx_reset` after such a use instead of parsing it afresh, and a routine called by the
-- statement could have replaced that name (DEALLOCATE + PREPARE) with a statement of its own
-- (docs/security.md, "It always runs, as itself").
--
-- How. The reset's read of the epoch row holds AccessShareLock on auth.routine_epoch until its
-- transaction ends, the request's statement included. The bump (every DDL that makes, alters or
-- drops a routine, extension or language, through the event triggers of 0014) now first takes
-- ACCESS EXCLUSIVE on the table, held until that DDL's transaction ends. So either the DDL got
-- it first: the reset's read waits until the DDL's transaction ended and its snapshot, taken
-- after the lock is granted, sees the new routine (`safe` false: no proof); or the reset got it
-- first: the DDL cannot commit, so its routine cannot be called, before the request's
-- transaction ended. Costs: nothing on a request (the read took that lock already, fast-path);
-- a transaction that makes a routine waits, at that statement, for the project's requests in
-- flight and holds the requests that start after it until it commits (also while it waits:
-- they queue behind its lock request, so during a long request that is at most the statement
-- timeout, as for an ALTER TABLE on a table requests read). A request whose
-- statement waits for a lock that transaction already holds (it altered a table the request
-- reads, then made a function) is a deadlock PostgreSQL resolves after deadlock_timeout (1 s)
-- by failing one of the two with 40P01.
-- Placeholders: {owner}, {readwrite}, {read}, {auth} (quoted identifiers).
SET LOCAL fluxbase.cdc_internal = 'on';
SET LOCAL ROLE {auth};

CREATE OR REPLACE FUNCTION auth.bump_routine_epoch() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    LOCK TABLE auth.routine_epoch IN ACCESS EXCLUSIVE MODE;
    INSERT INTO auth.routine_epoch AS e (id, n, safe) VALUES (true, 1, false)
        ON CONFLICT (id) DO UPDATE SET n = e.n + 1, safe = false;
    UPDATE auth.routine_epoch e SET safe = e.sealed AND auth.only_our_routines();
END
$$;
REVOKE ALL ON FUNCTION auth.bump_routine_epoch() FROM PUBLIC;

RESET ROLE;

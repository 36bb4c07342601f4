-- A project's database and roles (or MySQL database and accounts) that are not, or no longer,
-- a project: written before a creation makes anything (`creating`), and before a deletion or a
-- failed creation's clean-up drops it; removed once the drop succeeded, or in the transaction
-- that makes the created project's row. What a crash, or a drop that failed (a full lock
-- table: red team rt16), left behind is found here and dropped again by the server's sweep;
-- never a database or role of a name this table does not hold (a cluster may be shared).
CREATE TABLE fluxbase.project_teardowns (
    project_id text PRIMARY KEY,
    db_name text NOT NULL,
    engine text NOT NULL CHECK (engine IN ('postgresql', 'mysql')),
    -- A creation under way: swept only once older than the sweep's grace (another node may be
    -- creating it); false: nothing will come back for it, swept at the next sweep.
    creating boolean NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0
);

-- Row-level security: auth.uid(), the identity of the request, which no SQL sent through the API
-- can change (see src/rls.rs for the whole design). Placeholders: {owner}, {readwrite}, {read},
-- {auth} (quoted identifiers).
--
--  * {auth}: a NOLOGIN role with no members but the server's admin role. It owns schema auth and
--    everything in it, so no project role can alter, replace or drop any of it.
--  * auth.identity: the identity of each backend (pid) that the server set. UNLOGGED: never in
--    the WAL, so neither the change stream nor a replica or backup ever sees it.
--  * auth.secret: the per-project HMAC key (ipad/opad forms), derived by the server from its
--    instance secret and installed with bound parameters when missing. UNLOGGED as well: the key
--    never reaches the WAL; after a crash it is empty and the server installs it again.
--  * auth.set_uid(uid, tag): changes this backend's identity only with tag =
--    HMAC-SHA256(key, '<pid>:=<uid>' or '<pid>:-' for none), which only the server can compute.
--  * auth.uid(): this backend's identity (NULL when none).
-- The functions are SECURITY DEFINER with a fixed search_path, so a caller's objects or settings
-- cannot change what they resolve to.
SET LOCAL fluxbase.cdc_internal = 'on';

CREATE ROLE {auth} NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
-- The admin role installs the key; on a managed cluster it is no superuser and needs the role.
GRANT {auth} TO CURRENT_USER;
CREATE SCHEMA auth AUTHORIZATION {auth};
REVOKE ALL ON SCHEMA auth FROM PUBLIC;
GRANT USAGE ON SCHEMA auth TO {owner}, {readwrite}, {read};

SET LOCAL ROLE {auth};

CREATE UNLOGGED TABLE auth.identity (
    pid integer PRIMARY KEY,
    uid text
);

CREATE UNLOGGED TABLE auth.secret (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    inner_key bytea NOT NULL CHECK (length(inner_key) = 64),
    outer_key bytea NOT NULL CHECK (length(outer_key) = 64)
);

REVOKE ALL ON auth.identity, auth.secret FROM PUBLIC;

CREATE FUNCTION auth.uid() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT uid FROM auth.identity WHERE pid = pg_backend_pid()
$$;

CREATE FUNCTION auth.set_uid(new_uid text, tag text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    key record;
    message bytea;
BEGIN
    SELECT inner_key, outer_key INTO key FROM auth.secret;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the identity key of this project is not installed' USING ERRCODE = 'FX001';
    END IF;
    message := convert_to(pg_backend_pid()::text || ':' || coalesce('=' || new_uid, '-'), 'UTF8');
    IF tag IS NULL
       OR encode(sha256(key.outer_key || sha256(key.inner_key || message)), 'hex') <> tag THEN
        RAISE EXCEPTION 'invalid identity tag' USING ERRCODE = '28000';
    END IF;
    UPDATE auth.identity SET uid = new_uid WHERE pid = pg_backend_pid();
    IF NOT FOUND THEN
        -- A new backend: forget the rows of backends that are gone.
        DELETE FROM auth.identity i
        WHERE NOT EXISTS (SELECT 1 FROM pg_stat_get_activity(NULL) a WHERE a.pid = i.pid);
        INSERT INTO auth.identity (pid, uid) VALUES (pg_backend_pid(), new_uid);
    END IF;
END
$$;

REVOKE ALL ON FUNCTION auth.uid(), auth.set_uid(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth.uid(), auth.set_uid(text, text) TO {owner}, {readwrite}, {read};

RESET ROLE;

-- realtime.broadcast(event, payload): a custom broadcast from SQL. It travels through the WAL as a
-- transactional logical decoding message (prefix 'fluxbase.broadcast'), so it reaches the
-- project's realtime room only if, and when, its transaction commits.
CREATE SCHEMA realtime;
REVOKE ALL ON SCHEMA realtime FROM PUBLIC;
GRANT USAGE ON SCHEMA realtime TO {owner}, {readwrite}, {read};

CREATE FUNCTION realtime.broadcast(event text, payload jsonb DEFAULT '{}'::jsonb)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT pg_logical_emit_message(true, 'fluxbase.broadcast',
        json_build_object('event', event, 'payload', payload)::text)::text::void
$$;
REVOKE ALL ON FUNCTION realtime.broadcast(text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION realtime.broadcast(text, jsonb) TO {owner}, {readwrite};

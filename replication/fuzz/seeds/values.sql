-- The seed corpus of the `values` fuzz target: PostgreSQL's own text output of the shapes the
-- value codec parses. Regenerate with `replication/fuzz/seeds/generate.sh` (see its header).
SET DateStyle = ISO;
SET TimeZone = 'Asia/Kolkata';
SET extra_float_digits = 1;
CREATE TEMP TABLE seed(name text, value text);
CREATE TYPE pg_temp.pair AS (a int4, b text);
INSERT INTO seed VALUES
  ('bool', true::text),
  ('int8-min', (-9223372036854775808)::int8::text),
  ('numeric-long', 123456789012345678901234567890.123456789::numeric::text),
  ('numeric-nan', 'NaN'::numeric::text),
  ('float8-exp', 1e300::float8::text),
  ('float8-inf', '-Infinity'::float8::text),
  ('json', '{"a": [1, 2.5e3, "x\u00e9\"", null, {"b": true}]}'::json::text),
  ('jsonb', '{"a": [1, "\ud83d\ude00", {"b": false}]}'::jsonb::text),
  ('date-bc', '0044-03-15 BC'::date::text),
  ('timestamp', '2020-01-02 03:04:05.678901'::timestamp::text),
  ('timestamp-bc', '0044-03-15 12:00:00 BC'::timestamp::text),
  ('timestamp-infinity', 'infinity'::timestamp::text),
  ('timestamptz', '2020-01-02 03:04:05.6+00'::timestamptz::text),
  ('timestamptz-lmt', '1850-01-01 00:00:00+00'::timestamptz::text),
  ('int4-array', ARRAY[1, NULL, -3]::text),
  ('int4-array-2d-bounds', '[0:1][2:3]={{1,2},{3,4}}'::int4[]::text),
  ('text-array-quoted', ARRAY['a b', 'NULL', '', 'q"u\o,te', '{x}', 'é']::text),
  ('text-array-empty', '{}'::text[]::text),
  ('jsonb-array', ARRAY['{"a": 1}'::jsonb, '[1, "x,y"]', 'null']::text),
  ('box-array', ARRAY['((1,2),(3,4))'::box, '((0,0),(1,1))']::text),
  ('timestamptz-array', ARRAY['2020-01-02 03:04:05+05:30'::timestamptz, NULL]::text),
  ('bool-array-3d', '{{{t,f}},{{f,t}}}'::bool[]::text),
  ('int2vector', '1 2 3'::int2vector::text),
  ('oidvector', '23 25'::oidvector::text),
  ('composite', ROW(1, 'a b')::pg_temp.pair::text),
  ('composite-quotes', ROW(NULL, 'x"y\z,(w)')::pg_temp.pair::text),
  ('composite-empty-string', ROW(2, '')::pg_temp.pair::text),
  ('composite-array', ARRAY[ROW(1, 'x')::pg_temp.pair, ROW(NULL, 'y "z"')::pg_temp.pair]::text),
  ('record', ROW(1, 'two', ARRAY[3, 4], NULL)::text),
  ('int4range', '[1,2)'::int4range::text),
  ('int4range-empty', 'empty'::int4range::text),
  ('tstzrange', tstzrange('2020-01-01', NULL)::text),
  ('int4range-array', ARRAY['[1,5)'::int4range, '(,3]']::text),
  ('int4multirange', '{[1,3), [5,7)}'::int4multirange::text),
  ('uuid', '01234567-89ab-cdef-0123-456789abcdef'::uuid::text),
  ('bytea', '\xdeadbeef'::bytea::text),
  ('interval', '1 year 2 mons 3 days 04:05:06.7'::interval::text),
  -- hstore's output format (a literal: the hstore extension need not be installed)
  ('hstore-format', '"a"=>"1", "b"=>NULL, "c \"q\""=>"x\\y"');
\copy (SELECT name, translate(encode(convert_to(value, 'UTF8'), 'base64'), E'\n', '') FROM seed) TO pstdout WITH (FORMAT csv)

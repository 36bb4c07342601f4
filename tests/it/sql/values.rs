//! The value codec against its oracle: for every supported type, `write_json` on PostgreSQL's text
//! output must give what PostgreSQL's own `to_json()` gives, and `param_to_text` must give text
//! that PostgreSQL reads back as the intended value.
//!
//! Outputs are compared twice: as parsed `serde_json::Value`s, and as token lists that keep every
//! number's exact text and the order of keys (`serde_json` without `arbitrary_precision` would
//! round a 30-digit numeric to an `f64` on both sides and hide a lost digit).

use fluxbase_replication::values::{param_to_text, write_json, TypeRegistry};
use serde_json::{json, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support;

/// Types the cases below use, created in each test database.
const SCHEMA: &str = r#"
    CREATE EXTENSION hstore;
    CREATE TYPE mood AS ENUM ('happy', 'sad', 'so "so"');
    CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
    CREATE DOMAIN doc AS jsonb;
    CREATE TYPE pair AS (a int4, b text, gone int4);
    ALTER TYPE pair DROP ATTRIBUTE gone;
    CREATE TYPE nested AS (p pair, tags text[], m mood[], n posint, at timestamptz, d doc);
    CREATE DOMAIN pairdom AS pair;
    CREATE TYPE floatrange AS RANGE (subtype = float8);
"#;

async fn database() -> Client {
    let pg = support::pg().await;
    let db = pg.create_database().await;
    let client = pg.client(&db).await;
    client
        .batch_execute(SCHEMA)
        .await
        .expect("creating the test types");
    client
}

async fn text_rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The loop documented on `TypeRegistry`: ask for what is missing until nothing is.
async fn learn(client: &Client, registry: &mut TypeRegistry, oids: &[u32]) -> usize {
    let mut rounds = 0;
    loop {
        let missing = registry.missing(oids);
        if missing.is_empty() {
            return rounds;
        }
        assert!(
            rounds < 5,
            "types still missing after {rounds} rounds: {missing:?}"
        );
        let rows = text_rows(client, &TypeRegistry::catalog_query(&missing)).await;
        registry.absorb(&rows).expect("absorbing the catalog rows");
        rounds += 1;
    }
}

async fn type_oid(client: &Client, name: &str) -> u32 {
    let rows = text_rows(client, &format!("SELECT '{name}'::regtype::oid")).await;
    rows[0][0].as_deref().unwrap().parse().unwrap()
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// JSON tokens, strings decoded and numbers as written: equal lists mean the same JSON digit for
/// digit and key for key, whatever the whitespace and escaping.
fn tokens(json: &str) -> Vec<String> {
    let b = json.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'{' | b'}' | b'[' | b']' | b',' | b':' => {
                out.push((b[i] as char).to_string());
                i += 1;
            }
            b'"' => {
                let start = i;
                i += 1;
                while b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                let s: String = serde_json::from_str(&json[start..i])
                    .unwrap_or_else(|e| panic!("bad string in {json:?}: {e}"));
                out.push(format!("s:{s}"));
            }
            _ => {
                let start = i;
                while i < b.len() && !b" \t\n\r{}[],:\"".contains(&b[i]) {
                    i += 1;
                }
                out.push(format!("v:{}", &json[start..i]));
            }
        }
    }
    out
}

/// The same JSON value, with every number written the same, ignoring the order of keys (for
/// expectations written with `json!`, whose objects are sorted).
fn assert_same_value(ours: &str, theirs: &str, context: &str) {
    let parsed_ours: Value = serde_json::from_str(ours)
        .unwrap_or_else(|e| panic!("{context}: ours is not JSON ({e}): {ours}"));
    let parsed_theirs: Value = serde_json::from_str(theirs).unwrap();
    assert_eq!(
        parsed_ours, parsed_theirs,
        "{context}\n  ours:     {ours}\n  expected: {theirs}"
    );
    let numbers = |json: &str| {
        let mut numbers: Vec<String> = tokens(json)
            .into_iter()
            .filter(|t| t.starts_with("v:"))
            .collect();
        numbers.sort();
        numbers
    };
    assert_eq!(
        numbers(ours),
        numbers(theirs),
        "{context}\n  ours:     {ours}\n  expected: {theirs}"
    );
}

fn assert_same_json(ours: &str, theirs: &str, context: &str) {
    let parsed_ours: Value = serde_json::from_str(ours)
        .unwrap_or_else(|e| panic!("{context}: ours is not JSON ({e}): {ours}"));
    let parsed_theirs: Value = serde_json::from_str(theirs).unwrap();
    assert_eq!(
        parsed_ours, parsed_theirs,
        "{context}\n  ours:     {ours}\n  to_json:  {theirs}"
    );
    assert_eq!(
        tokens(ours),
        tokens(theirs),
        "{context}\n  ours:     {ours}\n  to_json:  {theirs}"
    );
}

/// Runs each expression through PostgreSQL and compares `write_json` on its text output with
/// its `to_json()`. The simple query protocol returns the type's output function text, as the
/// SQL API and pgoutput see it (`v::text` would not: `true::text` is `true`, not `t`).
async fn check_against_to_json(client: &Client, registry: &mut TypeRegistry, exprs: &[&str]) {
    for expr in exprs {
        let sql = format!(
            "SELECT pg_typeof(v)::oid::text, v, to_json(v)::text FROM (SELECT {expr} AS v) s"
        );
        let rows = text_rows(client, &sql).await;
        let oid: u32 = rows[0][0].as_deref().unwrap().parse().unwrap();
        learn(client, registry, &[oid]).await;
        let text = rows[0][1].as_deref();
        let to_json = rows[0][2].as_deref().unwrap_or("null");
        let mut ours = String::new();
        write_json(&mut ours, oid, text, registry);
        assert_same_json(
            &ours,
            to_json,
            &format!("{expr} (type {oid}, text {text:?})"),
        );
    }
}

const SCALARS: &[&str] = &[
    "NULL::int4",
    "true",
    "false",
    "NULL::bool",
    "(-32768)::int2",
    "32767::int2",
    "(-2147483648)::int4",
    "2147483647::int4",
    "(-9223372036854775808)::int8",
    "9223372036854775807::int8",
    "0::float4",
    "'-0'::float4",
    "1.5::float4",
    "'NaN'::float4",
    "'Infinity'::float4",
    "'-Infinity'::float4",
    "1e+20::float4",
    "1.5e-7::float4",
    "3.4028235e38::float4",
    "0.1::float8",
    "'-0'::float8",
    "'NaN'::float8",
    "'Infinity'::float8",
    "'-Infinity'::float8",
    "1e+20::float8",
    "1.5e-7::float8",
    "1.7976931348623157e308::float8",
    "5e-324::float8",
    "123456789012345678901234567890.123456789::numeric",
    "'-0.000000000000000000000000000001'::numeric",
    "1e40::numeric",
    "1.50::numeric",
    "0::numeric",
    "'NaN'::numeric",
    "'Infinity'::numeric",
    "'-Infinity'::numeric",
    "12::oid",
    "'plain'::text",
    "''::text",
    r#"'say "hi"'::text"#,
    r"'back\slash \\ double'::text",
    "'é ✓ 😀 日本'::text",
    "E'new\\nline\\ttab\\rcr\\x01ctrl\\x1f'::text",
    "'NULL'::text",
    "'ab'::varchar(10)",
    "'ab'::char(5)",
    "'pg_class'::name",
    "'x'::\"char\"",
    "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid",
    "'2020-02-29'::date",
    "'infinity'::date",
    "'-infinity'::date",
    "'0044-03-15 BC'::date",
    "'4713-01-01 BC'::date",
    "'5874897-12-31'::date",
    "'13:14:15.5'::time",
    "'13:14:15+05:30'::timetz",
    "'2020-01-02 03:04:05'::timestamp",
    "'2020-01-02 03:04:05.123456'::timestamp",
    "'2020-01-02 03:04:05.1'::timestamp",
    "'0044-03-15 10:00:00 BC'::timestamp",
    "'294276-12-31 23:59:59.999999'::timestamp",
    "'infinity'::timestamp",
    "'-infinity'::timestamp",
    "'1 year 2 mons 3 days 04:05:06.7'::interval",
    "'-1 day'::interval",
    r#"'{"a" : [1, 2.50, "x\u00e9"], "a": null}'::json"#,
    r#"'  "s"  '::json"#,
    "'null'::json",
    r#"'{"b": 1, "a": [true, {"c": null}], "n": 123456789012345678901234567890.5}'::jsonb"#,
    r#"'"x\"y"'::jsonb"#,
    "'[]'::jsonb",
    r"'\xdeadbeef'::bytea",
    "''::bytea",
    "'192.168.0.1/24'::inet",
    "'::1'::inet",
    "'10.0.0.0/8'::cidr",
    "'08:00:2b:01:02:03'::macaddr",
    "'08:00:2b:01:02:03:04:05'::macaddr8",
    "1234.56::money",
    "B'1010'::bit(4)",
    "B'101'::varbit",
    "'<a>x &amp; y</a>'::xml",
    "'(1,2)'::point",
    "'((0,0),(1,1))'::box",
    "'<(1,1),2>'::circle",
    "'a fat cat'::tsvector",
    "'a & b'::tsquery",
    "'[1,10)'::int4range",
    "'(1.5,2.5]'::numrange",
    "'empty'::int4range",
    "'[2020-01-01,2020-02-01)'::daterange",
    "'{[1,3),[5,7)}'::int4multirange",
    "'[1.5,2.5]'::floatrange",
    "'0/16B6C50'::pg_lsn",
    "'1 2'::int2vector",
    "'3 4'::oidvector",
    "'pg_class'::regclass",
    "'int4'::regtype",
    "'happy'::mood",
    r#"'so "so"'::mood"#,
    "5::posint",
    r#"'{"a": [1, 2]}'::doc"#,
    "5::information_schema.cardinal_number",
    "'x'::information_schema.sql_identifier",
    "ROW(1, 'a b')::pair",
    "ROW(NULL, '')::pair",
    r#"ROW(2, 'q"uo\te,(x)')::pair"#,
    "ROW(NULL, NULL)::pair",
    "ROW(3, 'x')::pairdom",
    r#"'a=>1, "b c"=>NULL, "q\\\""=>"", n=>NULL'::hstore"#,
    "''::hstore",
];

const ARRAYS: &[&str] = &[
    "'{}'::int4[]",
    "ARRAY[1, NULL, -3]::int4[]",
    "'{{1,2},{3,4}}'::int4[]",
    "'[0:1][2:3]={{1,2},{3,4}}'::int4[]",
    "'[-5:-4]={7,8}'::int8[]",
    "'{{{1,2}},{{3,NULL}}}'::int2[]",
    "ARRAY[true, false, NULL]",
    "ARRAY[9223372036854775807, -9223372036854775808]::int8[]",
    "ARRAY['NaN', 'Infinity', '-0', '1e+20', '1.5e-7', '0.1']::float8[]",
    "ARRAY['NaN', '-Infinity', '1.5']::float4[]",
    "ARRAY[123456789012345678901234567890.123456789, 'NaN', NULL]::numeric[]",
    r#"ARRAY['a"b', 'c\d', '', 'NULL', NULL, 'x y', '{', '}', 'a,b', 'é', E'l\nm', ' ', ';']::text[]"#,
    "ARRAY[['a', 'b'], ['c', NULL]]::text[]",
    "ARRAY['x ', 'ab']::varchar[]",
    "ARRAY['a', 'b']::char(3)[]",
    "ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', NULL]::uuid[]",
    "ARRAY['2020-02-29', 'infinity', '0044-03-15 BC', NULL]::date[]",
    "ARRAY['2020-01-02 03:04:05', '2020-01-02 03:04:05.5', 'infinity', '0044-03-15 10:00:00 BC']::timestamp[]",
    "ARRAY['13:14:15']::time[]",
    "ARRAY['1 day', '-00:00:01']::interval[]",
    r#"ARRAY['{"a" : 1}', '"s"', 'null', NULL, '[1, [2]]']::json[]"#,
    r#"ARRAY['{"a": 1, "b": "x\"y"}', '"s"', 'null', NULL, '[1, [2]]', '123456789012345678901234567890']::jsonb[]"#,
    "'{{\"{}\",\"[]\"},{\"1\",NULL}}'::jsonb[]",
    r"ARRAY['\xdeadbeef', '', NULL]::bytea[]",
    "ARRAY['192.168.0.1', '::1/128']::inet[]",
    "ARRAY['((0,0),(1,1))', '((2,2),(3,3))']::box[]",
    "ARRAY['(1,2)', '(3,4)']::point[]",
    "ARRAY['[1,10)', 'empty']::int4range[]",
    "ARRAY[1.5, 2]::money[]",
    "ARRAY['a fat cat']::tsvector[]",
    "ARRAY['1 2', '3']::int2vector[]",
    "ARRAY['happy', 'sad', 'so \"so\"', NULL]::mood[]",
    "ARRAY[1, 2, NULL]::posint[]",
    r#"ARRAY['{"a": 1}', NULL]::doc[]"#,
    "ARRAY[ROW(1, 'x')::pair, NULL, ROW(NULL, 'a\"b\\c')::pair, ROW(NULL, NULL)::pair]",
    "ARRAY[[ROW(1, 'x')::pair], [ROW(2, 'y,z')::pair]]",
    "ARRAY[ROW(3, '')::pairdom]",
    "ARRAY['a=>1, b=>NULL', '']::hstore[]",
    r#"ROW(ROW(1, 'a "b"')::pair, ARRAY['x', NULL, 'y z'], ARRAY['happy']::mood[], 5,
          '2020-01-02 03:04:05.5+00', '{"k": [1, "v"]}')::nested"#,
    r#"ARRAY[ROW(ROW(1, 'a "b"')::pair, ARRAY['x', NULL, 'y z'], ARRAY['happy']::mood[], 5,
          '2020-01-02 03:04:05.5+00', '{"k": [1, "v"]}')::nested, ROW(NULL, NULL, NULL, NULL, NULL, NULL)::nested]"#,
    "ARRAY[ARRAY[ROW(ROW(NULL, '{}')::pair, '{}', '{}', NULL, '-infinity', 'null')::nested]]",
];

#[tokio::test]
async fn every_type_renders_exactly_like_to_json() {
    let client = database().await;
    client
        .batch_execute("SET DateStyle = ISO; SET TimeZone = 'UTC'; SET lc_monetary = 'C'")
        .await
        .unwrap();
    let mut registry = TypeRegistry::new();
    check_against_to_json(&client, &mut registry, SCALARS).await;
    check_against_to_json(&client, &mut registry, ARRAYS).await;
}

#[tokio::test]
async fn timestamps_render_like_to_json_in_every_time_zone() {
    let client = database().await;
    let mut registry = TypeRegistry::new();
    let exprs = [
        "'2020-01-02 03:04:05+00'::timestamptz",
        "'2020-01-02 03:04:05.123456+00'::timestamptz",
        "'2020-07-01 12:00:00.5+02'::timestamptz",
        "'1850-01-01 12:00:00'::timestamptz",
        "'1900-01-01 00:00:00'::timestamptz",
        "'0044-03-15 10:00:00 BC'::timestamptz",
        "'294276-12-31 23:59:59.999999+00'::timestamptz",
        "'infinity'::timestamptz",
        "'-infinity'::timestamptz",
        "'2020-01-02 03:04:05'::timestamp",
        "ARRAY['2020-01-02 03:04:05+00', '1850-01-01 12:00:00', NULL, 'infinity']::timestamptz[]",
        "'[2020-01-01 00:00+00,2020-01-02 00:00+00)'::tstzrange",
    ];
    for zone in [
        "UTC",
        "Asia/Kolkata",
        "America/New_York",
        // Local mean time before 1892: an offset with seconds (+00:19:32).
        "Europe/Amsterdam",
        "America/St_Johns",
        "Pacific/Chatham",
        "Asia/Kathmandu",
        "-03:30",
    ] {
        client
            .batch_execute(&format!("SET DateStyle = ISO; SET TimeZone = '{zone}'"))
            .await
            .unwrap();
        check_against_to_json(&client, &mut registry, &exprs).await;
    }
}

#[tokio::test]
async fn catalog_loop_learns_nested_user_types_in_one_round() {
    let client = database().await;
    let mut registry = TypeRegistry::new();
    let nested_array = type_oid(&client, "nested[]").await;
    let pairdom = type_oid(&client, "pairdom").await;
    let mood = type_oid(&client, "mood").await;
    let oids = [nested_array, pairdom, mood, 23, 1009];
    assert!(!registry.missing(&oids).is_empty());
    assert_eq!(learn(&client, &mut registry, &oids).await, 1);
    assert!(registry.missing(&oids).is_empty());
    // An OID that does not exist is answered too, and then no longer missing.
    assert_eq!(learn(&client, &mut registry, &[4_000_000_000]).await, 1);
    let mut out = String::new();
    write_json(&mut out, 4_000_000_000, Some("x"), &registry);
    assert_eq!(out, "\"x\"");
}

#[tokio::test]
async fn params_round_trip_through_postgres() {
    let client = database().await;
    client
        .batch_execute("SET DateStyle = ISO; SET TimeZone = 'UTC'")
        .await
        .unwrap();
    let mut registry = TypeRegistry::new();
    // (value, type, what to_json gives back; None: the value itself)
    let cases: Vec<(Value, &str, Option<&str>)> = vec![
        (json!(null), "int4", None),
        (json!(true), "bool", None),
        (json!(false), "bool", None),
        (json!("t"), "bool", Some("true")),
        (json!(-32768), "int2", None),
        (json!(9_223_372_036_854_775_807_i64), "int8", None),
        (json!(-9_223_372_036_854_775_808_i64), "int8", None),
        (json!(1.5), "float8", None),
        (json!(0.1), "float4", None),
        (json!("NaN"), "float8", None),
        (json!("-Infinity"), "float8", None),
        (
            json!("123456789012345678901234567890.123456789"),
            "numeric",
            Some("123456789012345678901234567890.123456789"),
        ),
        (json!(18_446_744_073_709_551_615_u64), "numeric", None),
        (json!("it's a \"test\" \\ é ✓\n\ttab"), "text", None),
        (json!(""), "text", None),
        (json!(42), "text", Some(r#""42""#)),
        (json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), "uuid", None),
        (json!("2020-02-29"), "date", None),
        (json!("2020-01-02T03:04:05.5"), "timestamp", None),
        (
            json!("2020-01-02T03:04:05.5+05:30"),
            "timestamptz",
            Some(r#""2020-01-01T21:34:05.5+00:00""#),
        ),
        (json!("\\xdeadbeef"), "bytea", None),
        (json!({"a": [1, "x\"y", null], "b": {}}), "jsonb", None),
        (json!({"a": 1}), "json", None),
        (json!("plain string"), "jsonb", None),
        (json!(12.5), "jsonb", None),
        (json!([1, {"a": null}]), "jsonb", None),
        (json!({"a": [1, 2]}), "doc", None),
        (json!([1, null, 3]), "int4[]", None),
        (json!([]), "int4[]", None),
        (json!([[1, 2], [3, 4]]), "int4[]", None),
        (json!([[[1], [2]], [[3], [4]]]), "int8[]", None),
        (json!([true, false, null]), "bool[]", None),
        (json!([1.5, "NaN", null]), "float8[]", None),
        (
            json!(["a\"b", "c\\d", "", null, "NULL", "x,y", "{}", " ", "é", "l\nm", ";"]),
            "text[]",
            None,
        ),
        (json!([["a", "b"], ["c", null]]), "text[]", None),
        (json!(["x", "y"]), "varchar[]", None),
        (json!(["2020-02-29", "infinity", null]), "date[]", None),
        (json!(["\\xdeadbeef", null]), "bytea[]", None),
        (json!(["(1,1),(0,0)", "(3,3),(2,2)"]), "box[]", None),
        (json!(["[1,10)", "empty"]), "int4range[]", None),
        (
            json!([{"a": 1, "b": "x\"y"}, [1, [2]], "s", 1.5, null, {}]),
            "jsonb[]",
            None,
        ),
        (json!([{"a": 1}, "s"]), "json[]", None),
        (json!("happy"), "mood", None),
        (json!("so \"so\""), "mood", None),
        (json!(["happy", "so \"so\"", null]), "mood[]", None),
        (json!(5), "posint", None),
        (json!([5, null]), "posint[]", None),
        (json!({"a": 1, "b": "x \"y\" (z), \\"}), "pair", None),
        (json!({"b": ""}), "pair", Some(r#"{"a": null, "b": ""}"#)),
        (json!({"a": 3}), "pairdom", Some(r#"{"a": 3, "b": null}"#)),
        (
            json!("(7,seven)"),
            "pair",
            Some(r#"{"a": 7, "b": "seven"}"#),
        ),
        (
            json!([{"a": 1, "b": "x"}, null, {"a": null, "b": "a,b"}]),
            "pair[]",
            None,
        ),
        (
            json!({"p": {"a": 1, "b": "x,y"}, "tags": ["a", null, "b c"], "m": ["happy"], "n": 5,
                   "at": "2020-01-02T03:04:05.5+00:00", "d": {"k": [1, "v"]}}),
            "nested",
            None,
        ),
        (
            json!([{"p": null, "tags": [], "m": null, "n": null, "at": null, "d": [1]}]),
            "nested[]",
            None,
        ),
        (json!({"a": "1", "b c": null, "q\\\"": ""}), "hstore", None),
        (json!({"n": 5}), "hstore", Some(r#"{"n": "5"}"#)),
    ];
    for (value, type_name, expected) in cases {
        let oid = type_oid(&client, type_name).await;
        learn(&client, &mut registry, &[oid]).await;
        let text = param_to_text(&value, oid, &registry)
            .unwrap_or_else(|e| panic!("{value} as {type_name}: {e}"));
        let literal = text.as_deref().map_or("NULL".into(), quote_literal);
        let rows = text_rows(
            &client,
            &format!("SELECT to_json({literal}::{type_name})::text"),
        )
        .await;
        let back = rows[0][0].as_deref().unwrap_or("null");
        let context = format!("{value} as {type_name} (text {text:?})");
        match expected {
            Some(expected) => assert_same_json(back, expected, &context),
            None => assert_same_value(back, &value.to_string(), &context),
        }
    }
}

#[tokio::test]
async fn bad_params_are_left_for_postgres_to_refuse() {
    let client = database().await;
    let registry = TypeRegistry::new();
    for (value, type_name) in [
        (json!("abc"), "int4"),
        (json!([1, "x"]), "int4[]"),
        (json!([[1, 2], [3]]), "int4[]"),
        (json!({"a": 1}), "int4"),
        (json!(1.5), "int4"),
    ] {
        let oid = type_oid(&client, type_name).await;
        let text = param_to_text(&value, oid, &registry).unwrap().unwrap();
        let sql = format!("SELECT {}::{type_name}", quote_literal(&text));
        let err = client
            .simple_query(&sql)
            .await
            .expect_err(&format!("{value} as {type_name} should be refused"));
        let code = err.code().expect("a database error").code().to_owned();
        assert!(
            code == "22P02" || code == "2202E" || code == "22P04",
            "{value} as {type_name}: {err}"
        );
    }
}

/// `columnTypes`: each column's PostgreSQL type name beside `columns`, for built-in types,
/// arrays, and the project's own enum and composite types. A domain's column is its base type:
/// PostgreSQL's RowDescription names the base type's OID (as `psql`'s `\gdesc` shows).
#[tokio::test]
async fn column_types_name_each_columns_type() {
    let app = crate::support::spawn_app().await;
    let f = app.fixture().await;
    let body = app
        .sql(
            &f.admin,
            &f.project,
            "CREATE TYPE mood AS ENUM ('ok', 'sad'); CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
             CREATE TYPE pair AS (a int, b text);
             SELECT 1::int4 AS i, 'x'::text AS t, now() AS ts, '{}'::jsonb AS j, ARRAY[1, 2] AS arr,
                    'ok'::mood AS m, ARRAY['ok'::mood] AS ms, 5::posint AS p, ROW(1, 'x')::pair AS pr,
                    1.5::numeric AS n, NULL AS nothing",
        )
        .await;
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(
        body["result"]["columnTypes"],
        serde_json::json!([
            "int4",
            "text",
            "timestamptz",
            "jsonb",
            "int4[]",
            "mood",
            "mood[]",
            "int4",
            "pair",
            "numeric",
            "text"
        ]),
        "{body}"
    );
    // A statement without rows has none.
    let body = app
        .sql(&f.admin, &f.project, "CREATE TABLE t (id int)")
        .await;
    assert_eq!(
        body["result"]["columnTypes"],
        serde_json::json!([]),
        "{body}"
    );
}

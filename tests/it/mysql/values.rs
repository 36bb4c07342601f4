//! Each column type against what MariaDB itself returns: a row read through the API compared
//! with the server's own `JSON_OBJECT` of the same row, type by type, with the deliberate
//! differences named (ISO 8601 date-times, hex bytes, exact big numbers). The same row's
//! change event (from the binlog, which carries values in another form) must read exactly as
//! the SQL answer does, column by column.

use serde_json::{json, Value};

use crate::support::bus::events;
use crate::support::mariadb::spawn_mysql_app;

/// (column type, value as SQL, what the API answers, how MariaDB's JSON_OBJECT differs).
const TYPES: &[(&str, &str)] = &[
    ("tinyint", "-128"),
    ("tinyint unsigned", "255"),
    ("smallint", "-32768"),
    ("mediumint", "8388607"),
    ("int", "-2147483648"),
    ("int unsigned", "4294967295"),
    ("bigint", "-9223372036854775808"),
    ("bigint unsigned", "18446744073709551615"),
    ("decimal(30,10)", "12345678901234567890.0123456789"),
    ("decimal(5,2)", "-0.50"),
    ("float", "1.5"),
    ("double", "-2.25e-10"),
    ("bit(10)", "b'1000000011'"),
    ("boolean", "true"),
    ("year", "2024"),
    ("date", "'2024-02-29'"),
    ("datetime", "'2024-05-01 10:20:30'"),
    ("datetime(6)", "'2024-05-01 10:20:30.500000'"),
    ("timestamp(3)", "'2024-05-01 10:20:30.125'"),
    ("time", "'-838:59:59'"),
    ("time(2)", "'10:20:30.25'"),
    ("char(3)", "'ab'"),
    ("varchar(20)", "'héllo \"q\" \\\\ \\n'"),
    ("text", "'long text'"),
    ("enum('a','b')", "'b'"),
    ("set('x','y','z')", "'x,z'"),
    ("json", "'{\"a\": [1, 2.5, \"s\"], \"b\": null}'"),
    ("binary(3)", "x'00ff10'"),
    // The binlog strips a BINARY's trailing zero bytes.
    ("binary(4)", "x'ab000000'"),
    ("varbinary(8)", "x'deadbeef'"),
    ("blob", "x'0001'"),
    // MariaDB's own types (10.5+, UUID 10.7+, INET4 10.10+): fixed binary strings in the
    // binlog, text in answers. The IPv4-mapped and -compatible forms, MariaDB's `::` for a
    // single zero group, trailing zero bytes (stripped in the binlog).
    ("inet6", "'::1'"),
    ("inet6", "'::ffff:192.0.2.1'"),
    ("inet6", "'::192.0.2.1'"),
    ("inet6", "'2001:db8:0:1:1:1:1:1'"),
    ("inet6", "'FE80::'"),
    ("inet4", "'192.0.2.1'"),
    ("inet4", "'10.0.0.0'"),
    // A UUIDv1 (stored with its segments swapped, so that they sort by time), a v4 and a v7
    // (stored as they are), the nil UUID, and upper case in.
    ("uuid", "'6ccd780c-baba-1026-9564-5b8c656024db'"),
    ("uuid", "'f47ac10b-58cc-4372-a567-0e02b2c3d479'"),
    ("uuid", "'018f6a3e-9b1c-7d2e-8f00-0123456789ab'"),
    ("uuid", "'00000000-0000-0000-0000-000000000000'"),
    ("uuid", "'6CCD780C-BABA-1026-9564-5B8C65602400'"),
    // Geometry: its stored bytes (SRID and WKB) on both paths.
    ("point", "ST_GeomFromText('POINT(1 2)')"),
];

#[tokio::test]
async fn each_type_renders_as_mariadbs_own_json_object_says() {
    let app = spawn_mysql_app().await;
    let f = app.mysql_fixture().await;
    let columns: Vec<String> = TYPES
        .iter()
        .enumerate()
        .map(|(i, (ty, _))| format!("c{i} {ty}"))
        .collect();
    let values: Vec<&str> = TYPES.iter().map(|(_, v)| *v).collect();
    let mut sub = app.app.bus.project(&f.project).subscribe();
    app.rows(
        &f.admin,
        &f.project,
        &format!(
            "CREATE TABLE v (id int PRIMARY KEY, {}); INSERT INTO v VALUES (1, {}); INSERT INTO v (id) VALUES (2)",
            columns.join(", "),
            values.join(", ")
        ),
    )
    .await;
    // The table's creation, then the two rows' insertions.
    let changes = events(&mut sub, 3).await;
    assert_eq!(changes[0]["event_type"], "schema_update", "{}", changes[0]);
    let inserted = |id: i64| {
        changes
            .iter()
            .find(|e| e["operation"] == "INSERT" && e["record"]["id"] == id)
            .unwrap_or_else(|| panic!("no INSERT of row {id}: {changes:?}"))["record"]
            .clone()
    };
    let (event, nulls_event) = (inserted(1), inserted(2));
    // JSON_OBJECT writes the raw bytes of BIT and binary columns (not even valid JSON): those
    // are checked against HEX() instead.
    let bytes =
        |ty: &str| ty.starts_with("bit") || ty.contains("binary") || ty == "blob" || ty == "point";
    let pairs: Vec<String> = TYPES
        .iter()
        .enumerate()
        .filter(|(_, (ty, _))| !bytes(ty))
        .map(|(i, _)| format!("'c{i}', c{i}"))
        .collect();
    let hexes: Vec<String> = (0..TYPES.len())
        .map(|i| format!("HEX(c{i}) AS c{i}"))
        .collect();
    for (protocol, params) in [("text", None), ("binary", Some(json!([1])))] {
        let query = "SELECT * FROM v WHERE id = $1"
            .replace("$1", if params.is_some() { "$1" } else { "1" });
        let body = match &params {
            None => app.sql(&f.read, &f.project, &query).await,
            Some(p) => app.sql_params(&f.read, &f.project, &query, p.clone()).await,
        };
        assert_eq!(body["success"], true, "{body}");
        let ours = &body["result"]["rows"][0];
        let oracle = app
            .rows(
                &f.read,
                &f.project,
                &format!(
                    "SELECT JSON_OBJECT({}) AS o FROM v WHERE id = 1",
                    pairs.join(", ")
                ),
            )
            .await;
        let oracle: Value = match &oracle[0]["o"] {
            Value::String(s) => serde_json::from_str(s).unwrap(),
            other => other.clone(),
        };
        let hex = &app
            .rows(
                &f.read,
                &f.project,
                &format!("SELECT {} FROM v WHERE id = 1", hexes.join(", ")),
            )
            .await[0];
        for (i, (ty, _)) in TYPES.iter().enumerate() {
            let c = format!("c{i}");
            let (got, want) = (&ours[&c], &oracle[&c]);
            let raw = serde_json::to_string(got).unwrap();
            // The change event reads as the SQL answer does, whatever the type.
            assert_eq!(
                &event[&c], got,
                "{protocol} {ty}: the event has {}, the answer {raw}",
                event[&c]
            );
            match *ty {
                // Deliberate: ISO 8601 with `T`, the fraction without trailing zeros.
                t if t.starts_with("datetime") || t.starts_with("timestamp") => {
                    let want = want.as_str().unwrap().replacen(' ', "T", 1);
                    let want = if want.contains('.') {
                        want.trim_end_matches('0').trim_end_matches('.').to_string()
                    } else {
                        want
                    };
                    assert_eq!(got.as_str(), Some(want.as_str()), "{protocol} {ty}");
                }
                t if t.starts_with("time") => {
                    let want = want.as_str().unwrap();
                    let want = if want.contains('.') {
                        want.trim_end_matches('0').trim_end_matches('.')
                    } else {
                        want
                    };
                    assert_eq!(got.as_str(), Some(want), "{protocol} {ty}");
                }
                // Deliberate: bytes as PostgreSQL's bytea, `\x` and hex (JSON_OBJECT would put
                // the raw bytes in a string); checked against the server's HEX().
                t if t.contains("binary") || t == "blob" || t == "point" => {
                    let want = format!("\\x{}", hex[&c].as_str().unwrap().to_lowercase());
                    assert_eq!(got.as_str(), Some(want.as_str()), "{protocol} {ty}");
                }
                // BIT: the bits as a number (checked against HEX()).
                t if t.starts_with("bit") => {
                    let want = u64::from_str_radix(hex[&c].as_str().unwrap(), 16).unwrap();
                    assert_eq!(got.as_u64(), Some(want), "{protocol} {ty}");
                }
                // Exact digits: compared as text, never through a float.
                t if t.starts_with("bigint") || t.starts_with("decimal") => {
                    let want_raw = serde_json::to_string(want).unwrap();
                    assert_eq!(
                        raw.trim_matches('"'),
                        want_raw.trim_matches('"'),
                        "{protocol} {ty}"
                    );
                    assert!(got.is_number(), "{protocol} {ty}: {raw}");
                }
                _ => assert_eq!(got, want, "{protocol} {ty}: ours {raw}, MariaDB's {want}"),
            }
        }
        // NULL of every type is null.
        let nulls = app
            .rows(&f.read, &f.project, "SELECT * FROM v WHERE id = 2")
            .await;
        for i in 0..TYPES.len() {
            assert_eq!(nulls[0][format!("c{i}")], Value::Null);
            assert_eq!(nulls_event[format!("c{i}")], Value::Null);
        }
    }
}

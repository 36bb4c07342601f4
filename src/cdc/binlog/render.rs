//! Binlog values as JSON, through the SQL API's renderer ([`crate::mysql::render`]), so that a
//! row reads the same in `/api/execute-sql`, on the WebSocket and in a webhook.
//!
//! The binlog carries values in the storage format, which mysql_common decodes to
//! [`BinlogValue`]s; what differs from a result set's values is translated here first:
//!
//! | binlog                                   | as the SQL API has it                          |
//! |------------------------------------------|------------------------------------------------|
//! | ENUM: the value's index (1-based)        | its string (TABLE_MAP's ENUM_STR_VALUE)        |
//! | SET: a bitmask                           | its strings joined by `,` (SET_STR_VALUE)      |
//! | TIMESTAMP: seconds since the epoch (UTC) | a DATETIME in UTC (the SQL sessions' zone)     |
//! | MySQL JSON: binary JSON                  | the document                                   |
//! | MariaDB JSON: LONGTEXT                   | the document, when the catalog says it is JSON |

use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_async::{Column, Value};

use crate::mysql::render::{write_json, ColumnKind};

/// What the binlog says of a column beyond its type (see [`super::decode`]).
#[derive(Debug, Clone, Default)]
pub struct ColumnInfo {
    pub name: String,
    pub enum_values: Option<Vec<String>>,
    pub set_values: Option<Vec<String>>,
    /// Fractional digits of TIME2/DATETIME2/TIMESTAMP2.
    pub decimals: u8,
    /// A MariaDB `JSON` column (LONGTEXT with a `json_valid` check): embedded as JSON.
    pub json: bool,
}

/// Appends `value` of column `col` as JSON.
pub fn write_binlog_value(
    out: &mut String,
    col: &Column,
    value: &BinlogValue<'_>,
    info: Option<&ColumnInfo>,
) {
    write_binlog_value_of(out, ColumnKind::of(col), value, info)
}

/// Appends `value` of a column of `kind` as JSON (the stream's row loop computes each
/// column's kind once per TABLE_MAP).
pub fn write_binlog_value_of(
    out: &mut String,
    mut kind: ColumnKind,
    value: &BinlogValue<'_>,
    info: Option<&ColumnInfo>,
) {
    kind.json |= info.is_some_and(|i| i.json);
    match value {
        BinlogValue::Value(v) => write_value(out, kind, v, info),
        BinlogValue::Jsonb(j) => match j.clone().parse() {
            Ok(dom) => out.push_str(&serde_json::Value::from(dom).to_string()),
            Err(_) => out.push_str("null"),
        },
        // Refused before rendering (PARTIAL_UPDATE_ROWS); never a value of a full image.
        BinlogValue::JsonDiff(_) => out.push_str("null"),
    }
}

fn write_value(out: &mut String, kind: ColumnKind, v: &Value, info: Option<&ColumnInfo>) {
    use ColumnType::*;
    match (kind.ty, v) {
        (MYSQL_TYPE_ENUM, Value::Int(i)) => {
            // 0 is the empty string MySQL stores for an invalid value.
            let s = info
                .and_then(|info| info.enum_values.as_ref())
                .and_then(|values| {
                    let i = usize::try_from(*i).ok()?.checked_sub(1)?;
                    values.get(i)
                })
                .map_or("", String::as_str);
            write_json(out, &kind, &Value::Bytes(s.as_bytes().to_vec()));
        }
        (MYSQL_TYPE_SET, Value::Bytes(b)) => {
            let mask = b
                .iter()
                .rev()
                .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
            let text: Vec<&str> = info
                .and_then(|info| info.set_values.as_ref())
                .map(|names| {
                    names
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i < 64 && mask & (1 << i) != 0)
                        .map(|(_, n)| n.as_str())
                        .collect()
                })
                .unwrap_or_default();
            write_json(out, &kind, &Value::Bytes(text.join(",").into_bytes()));
        }
        (MYSQL_TYPE_TIMESTAMP, Value::Int(secs)) => write_timestamp(out, &kind, *secs, 0),
        (MYSQL_TYPE_TIMESTAMP2, Value::Bytes(b)) => {
            // `seconds[.micros]` (mysql_common writes six fractional digits).
            let text = String::from_utf8_lossy(b);
            let (secs, frac) = text.split_once('.').unwrap_or((&text, ""));
            let micros = format!("{:0<6}", &frac[..frac.len().min(6)]);
            write_timestamp(
                out,
                &kind,
                secs.parse().unwrap_or(0),
                micros.parse().unwrap_or(0),
            );
        }
        _ => write_json(out, &kind, v),
    }
}

/// A TIMESTAMP (seconds since the epoch) as the SQL API shows it: a DATETIME in UTC.
fn write_timestamp(out: &mut String, kind: &ColumnKind, secs: i64, micros: u32) {
    use chrono::{Datelike, Timelike};
    match chrono::DateTime::from_timestamp(secs, 0) {
        Some(t) => write_json(
            out,
            kind,
            &Value::Date(
                t.year() as u16,
                t.month() as u8,
                t.day() as u8,
                t.hour() as u8,
                t.minute() as u8,
                t.second() as u8,
                micros,
            ),
        ),
        None => out.push_str("null"),
    }
}

#[cfg(test)]
mod tests {
    use mysql_async::consts::ColumnFlags;

    use super::*;

    fn render(ty: ColumnType, charset: u16, v: Value, info: Option<&ColumnInfo>) -> String {
        let mut kind = ColumnKind::new(ty, ColumnFlags::empty(), charset);
        kind.json |= info.is_some_and(|i| i.json);
        let mut out = String::new();
        write_value(&mut out, kind, &v, info);
        out
    }

    #[test]
    fn binlog_values_render_as_execute_sql_renders_them() {
        use ColumnType::*;
        assert_eq!(
            render(MYSQL_TYPE_LONGLONG, 63, Value::Int(i64::MIN), None),
            i64::MIN.to_string()
        );
        assert_eq!(
            render(MYSQL_TYPE_LONGLONG, 63, Value::UInt(u64::MAX), None),
            "18446744073709551615"
        );
        assert_eq!(
            render(
                MYSQL_TYPE_NEWDECIMAL,
                63,
                Value::Bytes(b"-12345678901234567890.05".to_vec()),
                None
            ),
            "-12345678901234567890.05"
        );
        assert_eq!(
            render(
                MYSQL_TYPE_NEWDATE,
                63,
                Value::Date(2024, 2, 29, 0, 0, 0, 0),
                None
            ),
            "\"2024-02-29\""
        );
        assert_eq!(
            render(
                MYSQL_TYPE_DATETIME2,
                63,
                Value::Date(2024, 2, 29, 13, 4, 5, 250_000),
                None
            ),
            "\"2024-02-29T13:04:05.25\""
        );
        assert_eq!(
            render(
                MYSQL_TYPE_TIMESTAMP2,
                63,
                Value::Bytes(b"1700000000.500000".to_vec()),
                None
            ),
            "\"2023-11-14T22:13:20.5\""
        );
        assert_eq!(
            render(
                MYSQL_TYPE_TIMESTAMP2,
                63,
                Value::Bytes(b"1700000000".to_vec()),
                None
            ),
            "\"2023-11-14T22:13:20\""
        );
        assert_eq!(
            render(MYSQL_TYPE_TIMESTAMP, 63, Value::Int(0), None),
            "\"1970-01-01T00:00:00\""
        );
        assert_eq!(
            render(MYSQL_TYPE_YEAR, 63, Value::Bytes(b"2024".to_vec()), None),
            "2024"
        );
        assert_eq!(
            render(MYSQL_TYPE_BIT, 63, Value::Bytes(vec![1, 2]), None),
            "258"
        );
        assert_eq!(
            render(MYSQL_TYPE_BLOB, 63, Value::Bytes(vec![0xde, 0xad]), None),
            "\"\\\\xdead\""
        );
        assert_eq!(
            render(MYSQL_TYPE_BLOB, 45, Value::Bytes(b"h\"i".to_vec()), None),
            "\"h\\\"i\""
        );
        let info = ColumnInfo {
            enum_values: Some(vec!["a".into(), "b".into()]),
            set_values: Some(vec!["x".into(), "y".into(), "z".into()]),
            json: true,
            ..Default::default()
        };
        assert_eq!(
            render(MYSQL_TYPE_ENUM, 45, Value::Int(2), Some(&info)),
            "\"b\""
        );
        assert_eq!(
            render(MYSQL_TYPE_ENUM, 45, Value::Int(0), Some(&info)),
            "\"\""
        );
        assert_eq!(
            render(MYSQL_TYPE_SET, 45, Value::Bytes(vec![0b101]), Some(&info)),
            "\"x,z\""
        );
        assert_eq!(
            render(MYSQL_TYPE_SET, 45, Value::Bytes(vec![0]), Some(&info)),
            "\"\""
        );
        assert_eq!(
            render(
                MYSQL_TYPE_BLOB,
                45,
                Value::Bytes(br#"{"a": [1, 2]}"#.to_vec()),
                Some(&info)
            ),
            r#"{"a": [1, 2]}"#
        );
        // Not JSON after all: a string, never broken JSON.
        assert_eq!(
            render(
                MYSQL_TYPE_BLOB,
                45,
                Value::Bytes(b"{x".to_vec()),
                Some(&info)
            ),
            "\"{x\""
        );
    }
}

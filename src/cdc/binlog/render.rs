//! Binlog values as JSON, the way a row reads in `/api/execute-sql` on a MySQL project:
//! integers (BIGINT included) and DECIMAL as exact JSON numbers, DATE `YYYY-MM-DD`, DATETIME
//! ISO 8601 without a zone (`2024-05-01T12:00:00.250`), TIMESTAMP ISO 8601 in UTC with `Z`,
//! TIME `HH:MM:SS[.f]`, YEAR a number, JSON embedded (MySQL's binary JSON, and MariaDB's JSON
//! columns, LONGTEXT with a `json_valid` check), ENUM and SET by their strings, BIT a number,
//! binary strings and BLOBs as `\x`-prefixed hex, text as strings.
//!
//! The binlog carries values in the storage format (mysql_common decodes it to
//! [`BinlogValue`]); fractional digits of temporal types come from TABLE_MAP's metadata, ENUM
//! and SET strings from its optional metadata ([`ColumnInfo`]).

use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_async::{Column, Value};

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

/// The binary collation: a string column with it holds bytes, not text.
const BINARY_CHARSET: u16 = 63;

/// Appends `value` of column `col` as JSON.
pub fn write_binlog_value(
    out: &mut String,
    col: &Column,
    value: &BinlogValue<'_>,
    info: Option<&ColumnInfo>,
) {
    let ty = col.column_type();
    let decimals = info.map_or(0, |i| i.decimals);
    match value {
        BinlogValue::Value(v) => write_value(out, ty, col.character_set(), v, info, decimals),
        BinlogValue::Jsonb(j) => match j.clone().parse() {
            Ok(dom) => out.push_str(&serde_json::Value::from(dom).to_string()),
            Err(_) => out.push_str("null"),
        },
        // Refused before rendering (PARTIAL_UPDATE_ROWS); never a value of a full image.
        BinlogValue::JsonDiff(_) => out.push_str("null"),
    }
}

fn write_value(
    out: &mut String,
    ty: ColumnType,
    charset: u16,
    v: &Value,
    info: Option<&ColumnInfo>,
    decimals: u8,
) {
    use ColumnType::*;
    match v {
        Value::NULL => out.push_str("null"),
        Value::Int(i) => match (ty, info.and_then(|i| i.enum_values.as_ref())) {
            (MYSQL_TYPE_ENUM, Some(values)) => {
                // 0 is the empty string MySQL stores for an invalid value.
                let s = usize::try_from(*i)
                    .ok()
                    .and_then(|i| i.checked_sub(1))
                    .and_then(|i| values.get(i))
                    .map_or("", String::as_str);
                write_str(out, s);
            }
            (MYSQL_TYPE_TIMESTAMP, _) => write_timestamp(out, *i, 0, 0),
            _ => out.push_str(&i.to_string()),
        },
        Value::UInt(u) => out.push_str(&u.to_string()),
        Value::Float(f) if f.is_finite() => out.push_str(&f.to_string()),
        Value::Double(d) if d.is_finite() => out.push_str(&d.to_string()),
        Value::Float(_) | Value::Double(_) => out.push_str("null"),
        Value::Date(y, mo, d, h, mi, s, us) => {
            let mut text = format!("{y:04}-{mo:02}-{d:02}");
            if !matches!(ty, MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE) {
                text.push_str(&format!("T{h:02}:{mi:02}:{s:02}"));
                push_fraction(&mut text, *us, decimals);
            }
            write_str(out, &text);
        }
        Value::Time(neg, days, h, m, s, us) => {
            let hours = u64::from(*days) * 24 + u64::from(*h);
            let mut text = format!(
                "{}{hours:02}:{m:02}:{s:02}",
                if *neg { "-" } else { "" }
            );
            push_fraction(&mut text, *us, decimals);
            write_str(out, &text);
        }
        Value::Bytes(b) => match ty {
            MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL | MYSQL_TYPE_YEAR
                if b.iter()
                    .all(|c| c.is_ascii_digit() || matches!(c, b'-' | b'.')) =>
            {
                out.push_str(&String::from_utf8_lossy(b));
            }
            MYSQL_TYPE_TIMESTAMP2 => {
                let text = String::from_utf8_lossy(b);
                // `seconds[.micros]` (mysql_common writes six fractional digits).
                let (secs, frac) = text.split_once('.').unwrap_or((&text, ""));
                let micros = format!("{:0<6}", &frac[..frac.len().min(6)]);
                write_timestamp(
                    out,
                    secs.parse().unwrap_or(0),
                    micros.parse().unwrap_or(0),
                    decimals,
                );
            }
            MYSQL_TYPE_BIT => {
                let n = b.iter().fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
                out.push_str(&n.to_string());
            }
            MYSQL_TYPE_SET => {
                let mask = b
                    .iter()
                    .rev()
                    .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
                let names = info.and_then(|i| i.set_values.as_ref());
                let text: Vec<&str> = names
                    .map(|names| {
                        names
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| *i < 64 && mask & (1 << i) != 0)
                            .map(|(_, n)| n.as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                write_str(out, &text.join(","));
            }
            MYSQL_TYPE_GEOMETRY => write_hex(out, b),
            _ if charset == BINARY_CHARSET => write_hex(out, b),
            _ => {
                let text = String::from_utf8_lossy(b);
                if info.is_some_and(|i| i.json)
                    && serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok()
                {
                    // Embedded as it is, once checked to be JSON.
                    out.push_str(text.trim());
                } else {
                    write_str(out, &text);
                }
            }
        },
    }
}

fn push_fraction(text: &mut String, micros: u32, decimals: u8) {
    if decimals > 0 {
        let digits = format!("{micros:06}");
        text.push('.');
        text.push_str(&digits[..usize::from(decimals.min(6))]);
    }
}

/// A TIMESTAMP (seconds since the epoch, UTC) as ISO 8601 with `Z`.
fn write_timestamp(out: &mut String, secs: i64, micros: u32, decimals: u8) {
    match chrono::DateTime::from_timestamp(secs, 0) {
        Some(t) => {
            let mut text = t.format("%Y-%m-%dT%H:%M:%S").to_string();
            push_fraction(&mut text, micros, decimals);
            text.push('Z');
            write_str(out, &text);
        }
        None => out.push_str("null"),
    }
}

fn write_hex(out: &mut String, b: &[u8]) {
    out.push_str("\"\\\\x");
    out.push_str(&hex::encode(b));
    out.push('"');
}

fn write_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("strings serialize"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(ty: ColumnType, charset: u16, v: Value, info: Option<&ColumnInfo>, dec: u8) -> String {
        let mut out = String::new();
        write_value(&mut out, ty, charset, &v, info, dec);
        out
    }

    #[test]
    fn values_render_as_execute_sql_renders_them() {
        use ColumnType::*;
        assert_eq!(render(MYSQL_TYPE_LONGLONG, 63, Value::Int(i64::MIN), None, 0), i64::MIN.to_string());
        assert_eq!(render(MYSQL_TYPE_LONGLONG, 63, Value::UInt(u64::MAX), None, 0), "18446744073709551615");
        assert_eq!(
            render(MYSQL_TYPE_NEWDECIMAL, 63, Value::Bytes(b"-12345678901234567890.05".to_vec()), None, 0),
            "-12345678901234567890.05"
        );
        assert_eq!(render(MYSQL_TYPE_FLOAT, 63, Value::Float(0.1), None, 0), "0.1");
        assert_eq!(render(MYSQL_TYPE_DOUBLE, 63, Value::Double(f64::NAN), None, 0), "null");
        assert_eq!(render(MYSQL_TYPE_NEWDATE, 63, Value::Date(2024, 2, 29, 0, 0, 0, 0), None, 0), "\"2024-02-29\"");
        assert_eq!(
            render(MYSQL_TYPE_DATETIME2, 63, Value::Date(2024, 2, 29, 13, 4, 5, 250_000), None, 3),
            "\"2024-02-29T13:04:05.250\""
        );
        assert_eq!(
            render(MYSQL_TYPE_TIMESTAMP2, 63, Value::Bytes(b"1700000000.500000".to_vec()), None, 1),
            "\"2023-11-14T22:13:20.5Z\""
        );
        assert_eq!(
            render(MYSQL_TYPE_TIMESTAMP2, 63, Value::Bytes(b"1700000000".to_vec()), None, 0),
            "\"2023-11-14T22:13:20Z\""
        );
        assert_eq!(
            render(MYSQL_TYPE_TIME2, 63, Value::Time(true, 1, 2, 3, 4, 0), None, 0),
            "\"-26:03:04\""
        );
        assert_eq!(render(MYSQL_TYPE_YEAR, 63, Value::Bytes(b"2024".to_vec()), None, 0), "2024");
        assert_eq!(render(MYSQL_TYPE_BIT, 63, Value::Bytes(vec![1, 2]), None, 0), "258");
        assert_eq!(render(MYSQL_TYPE_BLOB, 63, Value::Bytes(vec![0xde, 0xad]), None, 0), "\"\\\\xdead\"");
        assert_eq!(render(MYSQL_TYPE_BLOB, 45, Value::Bytes(b"h\"i".to_vec()), None, 0), "\"h\\\"i\"");
        let info = ColumnInfo {
            enum_values: Some(vec!["a".into(), "b".into()]),
            set_values: Some(vec!["x".into(), "y".into(), "z".into()]),
            json: true,
            ..Default::default()
        };
        assert_eq!(render(MYSQL_TYPE_ENUM, 45, Value::Int(2), Some(&info), 0), "\"b\"");
        assert_eq!(render(MYSQL_TYPE_ENUM, 45, Value::Int(0), Some(&info), 0), "\"\"");
        assert_eq!(render(MYSQL_TYPE_SET, 45, Value::Bytes(vec![0b101]), Some(&info), 0), "\"x,z\"");
        assert_eq!(
            render(MYSQL_TYPE_BLOB, 45, Value::Bytes(br#"{"a": [1, 2]}"#.to_vec()), Some(&info), 0),
            r#"{"a": [1, 2]}"#
        );
        // Not JSON after all (the check was dropped): a string, never broken JSON.
        assert_eq!(render(MYSQL_TYPE_BLOB, 45, Value::Bytes(b"{x".to_vec()), Some(&info), 0), "\"{x\"");
    }
}

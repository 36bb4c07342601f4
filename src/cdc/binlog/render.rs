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
//! | BINARY(n): without its trailing zero bytes | all n bytes (zeros put back)                |
//! | MariaDB JSON: LONGTEXT                   | the document, when the catalog says it is JSON |
//! | MariaDB INET4, INET6: 4 or 16 bytes      | the address as MariaDB prints it (`::1`, `::ffff:192.0.2.1`), when the catalog says which |
//! | MariaDB UUID: 16 bytes                   | `6ccd780c-baba-1026-9564-5b8c656024db`, when the catalog says it is one |
//!
//! MariaDB's INET4, INET6 and UUID are fixed binary strings in the binlog, whose TABLE_MAP
//! does not name the type (a BINARY(16) looks the same): the stream reads which columns they
//! are from `information_schema` ([`CatalogType`]). A UUID travels in the binlog in its
//! in-memory order, which is its text's (MariaDB 10.10+ stores UUIDv1–v5 with their segments
//! swapped so that they sort by time, and swaps them back before it writes the binlog row):
//! its bytes are its text's hex digits in order. A binary string's trailing zero bytes are not
//! in the binlog (the server strips a CHAR's padding): a value of the type's fixed length is
//! padded back with zeros.

use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_async::{Column, Value};

use crate::mysql::render::{write_json, ColumnKind};

/// A MariaDB type the binlog does not name, known from the catalog (`information_schema`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogType {
    /// `JSON`: LONGTEXT with a `json_valid` check; embedded as JSON.
    Json,
    /// `INET4`: 4 bytes; `192.0.2.1`.
    Inet4,
    /// `INET6`: 16 bytes; `2001:db8::1`, `::ffff:192.0.2.1`.
    Inet6,
    /// `UUID`: 16 bytes; `6ccd780c-baba-1026-9564-5b8c656024db`.
    Uuid,
}

impl CatalogType {
    /// The type of a column whose `information_schema.COLUMNS.DATA_TYPE` is `data_type`, if it
    /// is one the binlog does not name (`json` stands for MariaDB's JSON check).
    pub fn of(data_type: &str) -> Option<CatalogType> {
        match data_type.to_ascii_lowercase().as_str() {
            "json" => Some(CatalogType::Json),
            "inet4" => Some(CatalogType::Inet4),
            "inet6" => Some(CatalogType::Inet6),
            "uuid" => Some(CatalogType::Uuid),
            _ => None,
        }
    }
}

/// What the binlog says of a column beyond its type (see [`super::decode`]), and what the
/// catalog adds.
#[derive(Debug, Clone, Default)]
pub struct ColumnInfo {
    pub name: String,
    pub enum_values: Option<Vec<String>>,
    pub set_values: Option<Vec<String>>,
    /// Fractional digits of TIME2/DATETIME2/TIMESTAMP2.
    pub decimals: u8,
    /// A MariaDB type the TABLE_MAP does not name, from the catalog.
    pub catalog: Option<CatalogType>,
    /// CHAR and BINARY: the length in bytes (the binlog strips a BINARY value's trailing zero
    /// bytes, which the SQL answer has).
    pub fixed_len: Option<usize>,
}

impl ColumnInfo {
    /// A MariaDB `JSON` column (LONGTEXT with a `json_valid` check): embedded as JSON.
    pub fn is_json(&self) -> bool {
        self.catalog == Some(CatalogType::Json)
    }
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
    kind.json |= info.is_some_and(ColumnInfo::is_json);
    match value {
        BinlogValue::Value(Value::Bytes(b)) if write_catalog_type(out, b, info) => {}
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
        (MYSQL_TYPE_STRING, Value::Bytes(b))
            if kind.binary && info.and_then(|i| i.fixed_len).is_some_and(|n| n > b.len()) =>
        {
            let mut padded = b.clone();
            padded.resize(info.and_then(|i| i.fixed_len).unwrap_or_default(), 0);
            write_json(out, &kind, &Value::Bytes(padded));
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

/// Writes the bytes of an INET4, INET6 or UUID column as MariaDB prints the value; false (and
/// nothing written) for any other column, or bytes that are not one of its values.
fn write_catalog_type(out: &mut String, bytes: &[u8], info: Option<&ColumnInfo>) -> bool {
    let Some(ty) = info.and_then(|i| i.catalog) else {
        return false;
    };
    let text = match ty {
        CatalogType::Json => return false,
        CatalogType::Inet4 => fixed::<4>(bytes).map(|b| inet4_text(&b)),
        CatalogType::Inet6 => fixed::<16>(bytes).map(|b| inet6_text(&b)),
        CatalogType::Uuid => fixed::<16>(bytes).map(|b| uuid_text(&b)),
    };
    match text {
        Some(text) => {
            crate::mysql::render::write_str(out, &text);
            true
        }
        None => false,
    }
}

/// A fixed-length binary value from its binlog bytes: its trailing zero bytes were stripped.
fn fixed<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
    let mut value = [0u8; N];
    value.get_mut(..bytes.len())?.copy_from_slice(bytes);
    Some(value)
}

/// `192.0.2.1`.
fn inet4_text(b: &[u8; 4]) -> String {
    format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3])
}

/// An IPv6 address as MariaDB's `Inet6::to_string` prints it: lowercase groups without leading
/// zeros; the longest run of zero groups (the first of equal runs, even a run of one) as `::`;
/// the IPv4-compatible (`::192.0.2.1`) and IPv4-mapped (`::ffff:192.0.2.1`) forms with their
/// last 32 bits dotted. (Not quite RFC 5952, which leaves a single zero group as `0`: the SQL
/// answer is MariaDB's text, and the event must read the same.)
fn inet6_text(b: &[u8; 16]) -> String {
    use std::fmt::Write;
    let words: Vec<u16> = b
        .chunks_exact(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]))
        .collect();
    // The longest run of zeros: (start, length).
    let (mut gap, mut run): ((usize, usize), Option<(usize, usize)>) = ((usize::MAX, 0), None);
    for (i, w) in words.iter().enumerate() {
        match (*w, &mut run) {
            (0, Some((_, len))) => *len += 1,
            (0, None) => run = Some((i, 1)),
            (_, Some(r)) => {
                if r.1 > gap.1 {
                    gap = *r;
                }
                run = None;
            }
            (_, None) => {}
        }
    }
    if let Some(r) = run {
        if r.1 > gap.1 {
            gap = r;
        }
    }
    let mut out = String::with_capacity(39);
    let mut i = 0;
    while i < 8 {
        if i == gap.0 {
            out.push_str(if i == 0 { "::" } else { ":" });
            i += gap.1;
            continue;
        }
        if i == 6 && gap.0 == 0 && (gap.1 == 6 || (gap.1 == 5 && words[5] == 0xffff)) {
            out.push_str(&inet4_text(&[b[12], b[13], b[14], b[15]]));
            break;
        }
        let _ = write!(out, "{:x}", words[i]);
        if i != 7 {
            out.push(':');
        }
        i += 1;
    }
    out
}

/// A UUID's bytes in its text's order as MariaDB prints them: lowercase, 8-4-4-4-12.
fn uuid_text(b: &[u8; 16]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        let _ = write!(out, "{byte:02x}");
    }
    out
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
    use crate::mysql::render::BINARY_CHARSET;

    fn render(ty: ColumnType, charset: u16, v: Value, info: Option<&ColumnInfo>) -> String {
        let kind = ColumnKind::new(ty, ColumnFlags::empty(), charset);
        let mut out = String::new();
        write_binlog_value_of(&mut out, kind, &BinlogValue::Value(v), info);
        out
    }

    /// What MariaDB 10.11 prints for these values (`SELECT CAST(x'…' AS INET6)`, and the same
    /// for INET4 and UUID); the integration test `mysql::values` compares with the server itself.
    #[test]
    fn inet_and_uuid_columns_render_as_mariadb_prints_them() {
        let of = |ty, hex: &str| {
            let info = ColumnInfo {
                catalog: Some(ty),
                ..Default::default()
            };
            let bytes = hex::decode(hex).unwrap();
            render(
                ColumnType::MYSQL_TYPE_STRING,
                BINARY_CHARSET,
                Value::Bytes(bytes),
                Some(&info),
            )
        };
        use CatalogType::*;
        for (hex, text) in [
            ("00000000000000000000000000000001", "::1"),
            ("", "::"),
            ("20010db8000000000000000000000001", "2001:db8::1"),
            ("20010db8000000010000000000000001", "2001:db8:0:1::1"),
            // A single zero group is `::` too (MariaDB's rule, not RFC 5952's).
            ("20010db8000100010001000100000001", "2001:db8:1:1:1:1::1"),
            // Of two equal runs, the first.
            ("20010000000000010000000000010001", "2001::1:0:0:1:1"),
            ("00000000000000000000ffffc0000201", "::ffff:192.0.2.1"),
            ("000000000000000000000000c0000201", "::192.0.2.1"),
            ("0000000000000000000100000000c000", "::1:0:0:c000"),
            // Trailing zero bytes stripped in the binlog: padded back.
            ("fe8", "fe80::"),
            (
                "ffffffffffffffffffffffffffffffff",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
        ] {
            let hex = if hex.len() % 2 == 1 {
                format!("{hex}0")
            } else {
                hex.to_string()
            };
            assert_eq!(of(Inet6, &hex), format!("\"{text}\""), "{hex}");
        }
        assert_eq!(of(Inet4, "c0000201"), "\"192.0.2.1\"");
        assert_eq!(of(Inet4, "0a"), "\"10.0.0.0\"");
        assert_eq!(
            of(Uuid, "6ccd780cbaba102695645b8c656024db"),
            "\"6ccd780c-baba-1026-9564-5b8c656024db\""
        );
        assert_eq!(of(Uuid, ""), "\"00000000-0000-0000-0000-000000000000\"");
        // Longer than the type: not one of its values, shown as the bytes they are.
        assert_eq!(of(Inet4, "0102030405"), "\"\\\\x0102030405\"");
        // A BINARY(4)'s trailing zeros, stripped in the binlog, are put back.
        let binary4 = ColumnInfo {
            fixed_len: Some(4),
            ..Default::default()
        };
        assert_eq!(
            render(
                ColumnType::MYSQL_TYPE_STRING,
                BINARY_CHARSET,
                Value::Bytes(vec![0xab]),
                Some(&binary4)
            ),
            "\"\\\\xab000000\""
        );
        // Without the catalog's word, a BINARY(16) is bytes.
        assert_eq!(
            render(
                ColumnType::MYSQL_TYPE_STRING,
                BINARY_CHARSET,
                Value::Bytes(vec![0, 1]),
                None
            ),
            "\"\\\\x0001\""
        );
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
            catalog: Some(CatalogType::Json),
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

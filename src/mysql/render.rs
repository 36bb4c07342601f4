//! MySQL values as JSON: one function of (column type, flags, value) shared by the SQL API's
//! rows and the change stream's row images, so that a row reads the same in both.
//!
//! | MySQL                                   | JSON                                              |
//! |-----------------------------------------|---------------------------------------------------|
//! | NULL                                    | `null`                                            |
//! | TINYINT … BIGINT (also UNSIGNED), YEAR  | number, exact digits (never through a float)      |
//! | DECIMAL                                 | number, exact digits as MySQL prints them         |
//! | FLOAT, DOUBLE                           | number (shortest form that reads back the same)   |
//! | BIT(n)                                  | number (the bits as an unsigned integer)          |
//! | DATE                                    | `"2024-05-01"`                                    |
//! | DATETIME, TIMESTAMP                     | `"2024-05-01T10:20:30.5"` (ISO 8601, no zone: the session's, UTC by default; fraction without trailing zeros, as PostgreSQL's `to_json`) |
//! | TIME                                    | `"-838:59:59"`, `"10:20:30.25"` (a duration)      |
//! | JSON                                    | the document itself, embedded                     |
//! | CHAR, VARCHAR, TEXT, ENUM, SET          | string                                            |
//! | BINARY, VARBINARY, BLOB, GEOMETRY       | `"\\x0a1b"`: hex, as PostgreSQL's bytea           |
//!
//! Values arrive as text (the text protocol: a statement without parameters) or typed (the
//! binary protocol of a prepared statement, and binlog row images): both render the same.

use mysql_async::consts::{ColumnFlags, ColumnType};
use mysql_async::{Column, Value};

/// What rendering needs to know about a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnKind {
    pub ty: ColumnType,
    pub unsigned: bool,
    /// The column holds bytes, not text (the `binary` character set, 63).
    pub binary: bool,
    /// A JSON document (MySQL's JSON type; a MariaDB JSON column when known from the catalog).
    pub json: bool,
    /// ENUM or SET (sent as strings either way).
    pub enumerated: bool,
}

/// The `binary` character set: bytes, not text.
pub const BINARY_CHARSET: u16 = 63;

impl ColumnKind {
    pub fn new(ty: ColumnType, flags: ColumnFlags, charset: u16) -> ColumnKind {
        use ColumnType::*;
        // Numbers and date-times carry the binary character set too: only strings are bytes.
        let string = matches!(
            ty,
            MYSQL_TYPE_VARCHAR
                | MYSQL_TYPE_VAR_STRING
                | MYSQL_TYPE_STRING
                | MYSQL_TYPE_TINY_BLOB
                | MYSQL_TYPE_MEDIUM_BLOB
                | MYSQL_TYPE_LONG_BLOB
                | MYSQL_TYPE_BLOB
        );
        ColumnKind {
            ty,
            unsigned: flags.contains(ColumnFlags::UNSIGNED_FLAG),
            binary: string && charset == BINARY_CHARSET,
            json: ty == ColumnType::MYSQL_TYPE_JSON,
            enumerated: flags.contains(ColumnFlags::ENUM_FLAG)
                || flags.contains(ColumnFlags::SET_FLAG)
                || matches!(ty, ColumnType::MYSQL_TYPE_ENUM | ColumnType::MYSQL_TYPE_SET),
        }
    }

    /// The kind of a result set's column.
    pub fn of(column: &Column) -> ColumnKind {
        ColumnKind::new(column.column_type(), column.flags(), column.character_set())
    }

    /// The type's name as `columnTypes` shows it: `int`, `bigint unsigned`, `varchar`, `json`.
    pub fn type_name(&self) -> String {
        use ColumnType::*;
        let base = match self.ty {
            MYSQL_TYPE_TINY => "tinyint",
            MYSQL_TYPE_SHORT => "smallint",
            MYSQL_TYPE_INT24 => "mediumint",
            MYSQL_TYPE_LONG => "int",
            MYSQL_TYPE_LONGLONG => "bigint",
            MYSQL_TYPE_DECIMAL | MYSQL_TYPE_NEWDECIMAL => "decimal",
            MYSQL_TYPE_FLOAT => "float",
            MYSQL_TYPE_DOUBLE => "double",
            MYSQL_TYPE_NULL => "null",
            MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2 => "timestamp",
            MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE => "date",
            MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2 => "time",
            MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2 => "datetime",
            MYSQL_TYPE_YEAR => "year",
            MYSQL_TYPE_BIT => "bit",
            MYSQL_TYPE_JSON => "json",
            MYSQL_TYPE_ENUM => "enum",
            MYSQL_TYPE_SET => "set",
            MYSQL_TYPE_GEOMETRY => "geometry",
            MYSQL_TYPE_VECTOR => "vector",
            _ if self.json => "json",
            _ if self.enumerated => "enum",
            MYSQL_TYPE_TINY_BLOB
            | MYSQL_TYPE_MEDIUM_BLOB
            | MYSQL_TYPE_LONG_BLOB
            | MYSQL_TYPE_BLOB => {
                if self.binary {
                    "blob"
                } else {
                    "text"
                }
            }
            MYSQL_TYPE_VARCHAR | MYSQL_TYPE_VAR_STRING => {
                if self.binary {
                    "varbinary"
                } else {
                    "varchar"
                }
            }
            MYSQL_TYPE_STRING => {
                if self.binary {
                    "binary"
                } else {
                    "char"
                }
            }
            _ => "unknown",
        };
        if self.unsigned && self.is_integer() {
            format!("{base} unsigned")
        } else {
            base.to_string()
        }
    }

    fn is_integer(&self) -> bool {
        use ColumnType::*;
        matches!(
            self.ty,
            MYSQL_TYPE_TINY
                | MYSQL_TYPE_SHORT
                | MYSQL_TYPE_INT24
                | MYSQL_TYPE_LONG
                | MYSQL_TYPE_LONGLONG
        )
    }

    fn is_number(&self) -> bool {
        use ColumnType::*;
        self.is_integer()
            || matches!(
                self.ty,
                MYSQL_TYPE_YEAR
                    | MYSQL_TYPE_DECIMAL
                    | MYSQL_TYPE_NEWDECIMAL
                    | MYSQL_TYPE_FLOAT
                    | MYSQL_TYPE_DOUBLE
            )
    }

    fn is_datetime(&self) -> bool {
        use ColumnType::*;
        matches!(
            self.ty,
            MYSQL_TYPE_DATETIME
                | MYSQL_TYPE_DATETIME2
                | MYSQL_TYPE_TIMESTAMP
                | MYSQL_TYPE_TIMESTAMP2
        )
    }

    fn is_date(&self) -> bool {
        matches!(
            self.ty,
            ColumnType::MYSQL_TYPE_DATE | ColumnType::MYSQL_TYPE_NEWDATE
        )
    }
}

/// Appends `value` of a column of `kind` to `out` as JSON.
pub fn write_json(out: &mut String, kind: &ColumnKind, value: &Value) {
    use std::fmt::Write;
    match value {
        Value::NULL => out.push_str("null"),
        Value::Int(i) => {
            if *i < 0 {
                out.push('-');
            }
            push_digits(out, i.unsigned_abs(), 1);
        }
        Value::UInt(u) => push_digits(out, *u, 1),
        Value::Float(f) => write_float(out, f64::from(*f), &f.to_string()),
        Value::Double(d) => write_float(out, *d, &d.to_string()),
        // Digits, dashes, colons and a dot: nothing to escape, written in place.
        Value::Date(y, mo, d, h, mi, s, us) => {
            // By hand: `write!` was most of a DATETIME's cost in the binlog's row loop.
            out.push('"');
            push_digits(out, u64::from(*y), 4);
            out.push('-');
            push_digits(out, u64::from(*mo), 2);
            out.push('-');
            push_digits(out, u64::from(*d), 2);
            if !kind.is_date() {
                out.push('T');
                push_digits(out, u64::from(*h), 2);
                out.push(':');
                push_digits(out, u64::from(*mi), 2);
                out.push(':');
                push_digits(out, u64::from(*s), 2);
                push_fraction(out, *us);
            }
            out.push('"');
        }
        Value::Time(neg, days, h, mi, s, us) => {
            let hours = u64::from(*days) * 24 + u64::from(*h);
            out.push('"');
            let _ = write!(
                out,
                "{}{hours:02}:{mi:02}:{s:02}",
                if *neg { "-" } else { "" }
            );
            push_fraction(out, *us);
            out.push('"');
        }
        Value::Bytes(bytes) => write_bytes(out, kind, bytes),
    }
}

/// `value` as a `serde_json::Value` (what [`write_json`] writes, parsed).
pub fn to_json(kind: &ColumnKind, value: &Value) -> serde_json::Value {
    let mut out = String::new();
    write_json(&mut out, kind, value);
    serde_json::from_str(&out).unwrap_or(serde_json::Value::String(out))
}

fn write_bytes(out: &mut String, kind: &ColumnKind, bytes: &[u8]) {
    use ColumnType::*;
    if kind.ty == MYSQL_TYPE_BIT {
        // Big-endian bits: at most 64 of them.
        let n = bytes
            .iter()
            .rev()
            .take(8)
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        out.push_str(&n.to_string());
        return;
    }
    if kind.is_number() {
        match std::str::from_utf8(bytes) {
            Ok(text) if is_json_number(text) => out.push_str(text),
            Ok(text) => write_str(out, text),
            Err(_) => write_hex(out, bytes),
        }
        return;
    }
    if kind.json {
        if let Ok(text) = std::str::from_utf8(bytes) {
            if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
                out.push_str(text.trim());
                return;
            }
        }
    }
    if kind.is_date() {
        write_str(out, &String::from_utf8_lossy(bytes));
        return;
    }
    if kind.is_datetime() {
        let text = String::from_utf8_lossy(bytes);
        let mut iso = text.replacen(' ', "T", 1);
        trim_fraction(&mut iso);
        write_str(out, &iso);
        return;
    }
    if kind.ty == MYSQL_TYPE_TIME || kind.ty == MYSQL_TYPE_TIME2 {
        let mut text = String::from_utf8_lossy(bytes).into_owned();
        trim_fraction(&mut text);
        write_str(out, &text);
        return;
    }
    if kind.binary || kind.ty == MYSQL_TYPE_GEOMETRY {
        write_hex(out, bytes);
        return;
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => write_str(out, text),
        // Text that is not UTF-8 (a latin1 column read through a binary result): its bytes.
        Err(_) => write_hex(out, bytes),
    }
}

fn write_float(out: &mut String, value: f64, text: &str) {
    if value.is_finite() {
        out.push_str(text);
    } else {
        write_str(out, text);
    }
}

fn push_fraction(text: &mut String, mut micros: u32) {
    if micros > 0 {
        // Six digits without the trailing zeros.
        let mut width = 6;
        while micros.is_multiple_of(10) {
            micros /= 10;
            width -= 1;
        }
        text.push('.');
        push_digits(text, u64::from(micros), width);
    }
}

/// `value` in decimal, zero-padded to at least `width` digits (as `{value:0width$}`).
fn push_digits(out: &mut String, mut value: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for _ in digits.len()..width {
        out.push('0');
    }
    at = at.min(digits.len().saturating_sub(width));
    for &d in &digits[at..] {
        out.push(char::from(d));
    }
}

/// `10:20:30.500000` → `10:20:30.5`; `10:20:30.000000` → `10:20:30`.
fn trim_fraction(text: &mut String) {
    if let Some(dot) = text.rfind('.') {
        if text[dot + 1..].bytes().all(|b| b.is_ascii_digit()) {
            let kept = text[..].trim_end_matches('0').len();
            text.truncate(kept.max(dot));
            if text.ends_with('.') {
                text.pop();
            }
        }
    }
}

fn write_hex(out: &mut String, bytes: &[u8]) {
    out.push_str("\"\\\\x");
    out.push_str(&hex::encode(bytes));
    out.push('"');
}

/// `text` as a JSON string, escaped as serde_json escapes (`"`, `\\`, and control characters:
/// `\b \t \n \f \r` by name, the others `\u00XX` in lower-case hex), without allocating.
pub fn write_str(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(text.len() + 2);
    out.push('"');
    let bytes = text.as_bytes();
    // Most text has nothing to escape: whole blocks of it are checked at once (a loop without
    // an early exit, which the compiler vectorizes), and the first block that has something
    // is escaped byte by byte from there.
    const BLOCK: usize = 32;
    let clean = bytes
        .chunks_exact(BLOCK)
        .take_while(|block| {
            !block.iter().fold(false, |any, &b| {
                any | (b < 0x20) | (b == b'"') | (b == b'\\')
            })
        })
        .count()
        * BLOCK;
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate().skip(clean) {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        // Escapes are ASCII, so `i` is on a character boundary.
        out.push_str(&text[start..i]);
        if short.is_empty() {
            out.push_str("\\u00");
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
    out.push_str(&text[start..]);
    out.push('"');
}

/// Whether `text` is a number as JSON writes it (MySQL's `-0.50`, `1e30`, `12`).
fn is_json_number(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(ty: ColumnType) -> ColumnKind {
        ColumnKind::new(ty, ColumnFlags::empty(), 45)
    }

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        let mut all: Vec<String> = (0u32..0x800)
            .filter_map(char::from_u32)
            .map(|c| format!("a{c}b{c}"))
            .collect();
        all.extend(
            [
                "",
                "\"",
                "\\",
                "日本\u{0}😀\u{7f}\u{2028}",
                "\u{1f}\u{1f}",
                "plain text",
            ]
            .map(String::from),
        );
        // Every pair of characters from a pool of escapes and multi-byte ones.
        let pool = [
            'a', '"', '\\', '\n', '\u{1}', 'é', '😀', '\u{1f}', '/', '\u{7f}',
        ];
        for x in pool {
            for y in pool {
                for z in pool {
                    all.push([x, y, z].iter().collect());
                }
            }
        }
        // Long text, each escape (and a multi-byte character) at every place around the
        // blocks checked at once: before, inside, on and after their edges.
        for special in ['"', '\\', '\n', '\u{1}', '\u{1f}', 'é', '😀'] {
            for at in 0..100 {
                let mut text = "x".repeat(at);
                text.push(special);
                text.push_str(&"y".repeat(100 - at));
                all.push(text);
            }
        }
        for text in all {
            let mut out = String::from("prefix");
            write_str(&mut out, &text);
            assert_eq!(
                out,
                format!("prefix{}", serde_json::to_string(&text).unwrap()),
                "{text:?}"
            );
        }
    }

    #[test]
    fn integers_and_date_times_are_written_as_format_writes_them() {
        for v in [
            0u64,
            1,
            9,
            10,
            99,
            100,
            1234,
            99_999,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            for width in [1, 2, 4, 6, 25] {
                let mut out = String::new();
                push_digits(&mut out, v, width);
                assert_eq!(out, format!("{v:0width$}"));
            }
        }
        let k = kind(ColumnType::MYSQL_TYPE_LONGLONG);
        for i in [0i64, -1, 7, -42, i64::MIN, i64::MAX] {
            let mut out = String::new();
            write_json(&mut out, &k, &Value::Int(i));
            assert_eq!(out, i.to_string());
        }
        let mut out = String::new();
        write_json(&mut out, &k, &Value::UInt(u64::MAX));
        assert_eq!(out, u64::MAX.to_string());
        for (ty, value, text) in [
            (
                ColumnType::MYSQL_TYPE_DATETIME,
                Value::Date(2024, 5, 1, 9, 8, 7, 500_000),
                "\"2024-05-01T09:08:07.5\"",
            ),
            (
                ColumnType::MYSQL_TYPE_DATETIME,
                Value::Date(12, 1, 2, 0, 0, 0, 1),
                "\"0012-01-02T00:00:00.000001\"",
            ),
            (
                ColumnType::MYSQL_TYPE_DATE,
                Value::Date(2024, 12, 31, 0, 0, 0, 0),
                "\"2024-12-31\"",
            ),
        ] {
            let mut out = String::new();
            write_json(&mut out, &kind(ty), &value);
            assert_eq!(out, text);
        }
    }

    #[test]
    fn fractions_lose_their_trailing_zeros_only() {
        for micros in (0..1_000_000)
            .step_by(7)
            .chain([1, 10, 100_000, 999_999, 500_000, 120])
        {
            let mut ours = String::new();
            push_fraction(&mut ours, micros);
            // The former formatting.
            let expected = if micros > 0 {
                format!(".{}", format!("{micros:06}").trim_end_matches('0'))
            } else {
                String::new()
            };
            assert_eq!(ours, expected, "{micros}");
        }
    }

    fn text(ty: ColumnType, s: &str) -> String {
        let mut out = String::new();
        write_json(&mut out, &kind(ty), &Value::Bytes(s.as_bytes().to_vec()));
        out
    }

    #[test]
    fn text_and_binary_protocol_values_render_alike() {
        use ColumnType::*;
        let cases: Vec<(ColumnType, &str, Value, &str)> = vec![
            (
                MYSQL_TYPE_LONGLONG,
                "18446744073709551615",
                Value::UInt(u64::MAX),
                "18446744073709551615",
            ),
            (
                MYSQL_TYPE_LONGLONG,
                "-9223372036854775808",
                Value::Int(i64::MIN),
                "-9223372036854775808",
            ),
            (MYSQL_TYPE_DOUBLE, "1.5", Value::Double(1.5), "1.5"),
            (
                MYSQL_TYPE_DATE,
                "2024-05-01",
                Value::Date(2024, 5, 1, 0, 0, 0, 0),
                "\"2024-05-01\"",
            ),
            (
                MYSQL_TYPE_DATETIME,
                "2024-05-01 10:20:30.500000",
                Value::Date(2024, 5, 1, 10, 20, 30, 500_000),
                "\"2024-05-01T10:20:30.5\"",
            ),
            (
                MYSQL_TYPE_TIMESTAMP,
                "2024-05-01 10:20:30",
                Value::Date(2024, 5, 1, 10, 20, 30, 0),
                "\"2024-05-01T10:20:30\"",
            ),
            (
                MYSQL_TYPE_TIME,
                "-838:59:59",
                Value::Time(true, 34, 22, 59, 59, 0),
                "\"-838:59:59\"",
            ),
            (
                MYSQL_TYPE_TIME,
                "10:20:30.250000",
                Value::Time(false, 0, 10, 20, 30, 250_000),
                "\"10:20:30.25\"",
            ),
        ];
        for (ty, t, typed, want) in cases {
            assert_eq!(text(ty, t), want, "{ty:?} as text");
            let mut out = String::new();
            write_json(&mut out, &kind(ty), &typed);
            assert_eq!(out, want, "{ty:?} typed");
        }
    }

    #[test]
    fn decimals_stay_exact_and_bytes_are_hex() {
        use ColumnType::*;
        assert_eq!(
            text(MYSQL_TYPE_NEWDECIMAL, "12345678901234567890.123456789"),
            "12345678901234567890.123456789"
        );
        assert_eq!(text(MYSQL_TYPE_NEWDECIMAL, "-0.50"), "-0.50");
        let blob = ColumnKind::new(MYSQL_TYPE_BLOB, ColumnFlags::BINARY_FLAG, BINARY_CHARSET);
        let mut out = String::new();
        write_json(&mut out, &blob, &Value::Bytes(vec![0, 0xab, 0x10]));
        assert_eq!(out, r#""\\x00ab10""#);
        assert_eq!(serde_json::from_str::<String>(&out).unwrap(), "\\x00ab10");
        let mut json = kind(MYSQL_TYPE_BLOB);
        json.json = true;
        assert_eq!(
            to_json(&json, &Value::Bytes(br#"{"a": [1, 2]}"#.to_vec())),
            serde_json::json!({"a": [1, 2]})
        );
        assert_eq!(text(MYSQL_TYPE_BIT, "\u{1}"), "1");
        assert_eq!(text(MYSQL_TYPE_VAR_STRING, "a \"q\"\n"), r#""a \"q\"\n""#);
    }

    #[test]
    fn only_strings_of_the_binary_charset_are_bytes() {
        use ColumnType::*;
        let date = ColumnKind::new(MYSQL_TYPE_DATE, ColumnFlags::BINARY_FLAG, BINARY_CHARSET);
        assert!(!date.binary);
        let mut out = String::new();
        write_json(&mut out, &date, &Value::Bytes(b"2024-02-29".to_vec()));
        assert_eq!(out, "\"2024-02-29\"");
        assert!(
            ColumnKind::new(
                MYSQL_TYPE_VAR_STRING,
                ColumnFlags::BINARY_FLAG,
                BINARY_CHARSET
            )
            .binary
        );
    }

    #[test]
    fn only_json_numbers_pass_as_numbers() {
        for ok in ["0", "-1", "1.25", "1e30", "-1.5E-7", "0.50"] {
            assert!(is_json_number(ok), "{ok}");
        }
        for bad in ["", "-", "01", ".5", "1.", "1e", "inf", "NaN", "1,5"] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }
}

//! The value codec: PostgreSQL TEXT values to JSON exactly as `to_json()` renders them, and JSON
//! request parameters to PostgreSQL TEXT input.
//!
//! # Why from text
//!
//! Both producers of rows in Fluxbase hand us values in PostgreSQL's text format together with the
//! type OID: the SQL API (simple and extended query protocol with text results, see
//! [`crate::wire`]) and the change stream (`pgoutput` sends tuple data as text unless `binary` is
//! requested). PostgreSQL's own `to_json()` works on the binary datum, so this module re-derives
//! the same JSON from the text output. The rules are those of PostgreSQL 15's
//! [`json.c`](https://github.com/postgres/postgres/blob/REL_15_STABLE/src/backend/utils/adt/json.c)
//! (`json_categorize_type` and `datum_to_json`), after resolving domains to their base type:
//!
//! | category                         | text (DateStyle ISO)           | JSON                              |
//! |----------------------------------|--------------------------------|-----------------------------------|
//! | NULL                             |                                | `null`                            |
//! | bool                             | `t` / `f`                      | `true` / `false`                  |
//! | int2/4/8, float4/8, numeric      | `12`, `1e+20`, `NaN`           | raw number if it is valid JSON, else a string (`"NaN"`) |
//! | json, jsonb                      | the document                   | embedded as is                    |
//! | date                             | `2020-01-02`, `0044-03-15 BC`  | the same text as a string         |
//! | timestamp                        | `2020-01-02 03:04:05.6`        | `"2020-01-02T03:04:05.6"`         |
//! | timestamptz                      | `2020-01-02 03:04:05+00`       | `"2020-01-02T03:04:05+00:00"` (XSD: minutes always, seconds when not zero, ` BC` kept) |
//! | arrays (true varlena arrays)     | `[0:1]={1,NULL}`               | `[1,null]`, nested per dimension  |
//! | int2vector, oidvector            | `1 2`                          | `[1,2]` / `["1","2"]`             |
//! | composites                       | `(1,"a b",)`                   | `{"x":1,"y":"a b","z":null}`      |
//! | hstore (its cast to json)        | `"a"=>"1", "b"=>NULL`          | `{"a":"1","b":null}`              |
//! | everything else                  | any                            | the text as a JSON string         |
//!
//! Numbers are never converted through `f64`: the text PostgreSQL printed is copied, so `int8`
//! extremes and 30-digit `numeric` values keep every digit. Malformed input never panics: a value
//! whose text does not have the expected shape (e.g. a timestamp printed under another DateStyle,
//! or a composite whose type changed since it was learned) is written as a JSON string.
//!
//! # Types
//!
//! [`TypeRegistry`] knows every built-in type by OID (stable across PostgreSQL versions). Other
//! types (enums, domains, composites, ranges, extension types, arrays of those, and the
//! `information_schema` domains) are learned from the catalog of the database the values come
//! from; see [`TypeRegistry::catalog_query`] for the loop. A type that is still unknown renders
//! its values as JSON strings.
//!
//! # Parameters
//!
//! [`param_to_text`] goes the other way for request parameters whose type PostgreSQL inferred. It
//! only builds the text; PostgreSQL's own input function for the type does the final validation,
//! and the server reports that error naming the parameter.
//!
//! # Differences from `to_json()`
//!
//! * A user-defined type with a cast to `json` (other than hstore's `hstore_to_json`) is rendered
//!   as a string: `to_json()` would call the cast function, which we cannot run on text.
//! * Anonymous `record` values (e.g. `SELECT ROW(1, 'a')`) are rendered as strings: their
//!   attribute names and types are not in the catalog. Arrays of `record` and `anyarray` values
//!   (e.g. `pg_stats.most_common_vals`) become arrays of strings.
//! * `to_json()` formats dates and timestamps itself, whatever the session's DateStyle; here the
//!   text must come from a session with `DateStyle = ISO` (anything else is kept as a string).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use serde_json::{Map, Value};

/// How deep types may nest (domain over array of composite of ...) and how deep a JSON parameter
/// may nest before we give up. Far above anything PostgreSQL produces (arrays have at most 6
/// dimensions), low enough to keep recursion harmless.
pub const MAX_DEPTH: usize = 64;

/// Errors of the value codec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValueError {
    /// A row given to [`TypeRegistry::absorb`] does not have the shape of
    /// [`TypeRegistry::catalog_query`]'s result. A bug or a foreign query: fail, do not retry.
    #[error("catalog row {row}: {reason}")]
    Catalog { row: usize, reason: String },
    /// A JSON object parameter for a composite type names an attribute the type does not have.
    #[error("type {type_oid} has no attribute named {name:?}")]
    UnknownAttribute { type_oid: u32, name: String },
    /// A JSON parameter nests deeper than [`MAX_DEPTH`].
    #[error("value nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// PostgreSQL text values cannot contain the NUL character (`\u0000`).
    #[error("text values cannot contain the NUL character (\\u0000)")]
    NulCharacter,
}

/// One attribute of a composite type, in `attnum` order (dropped attributes excluded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribute {
    pub name: String,
    pub type_oid: u32,
}

/// What a learned (non built-in) type is, as far as JSON is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LearnedKind {
    Domain { base: u32 },
    Array { elem: u32 },
    Composite { attrs: Vec<Attribute> },
    Hstore,
    Text,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct LearnedType {
    kind: LearnedKind,
    delim: u8,
    /// `pg_type.typname`.
    name: String,
}

/// A type resolved to its `to_json()` category (domains already followed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind<'a> {
    Bool,
    Number,
    Json,
    Timestamp,
    TimestampTz,
    Array {
        elem: u32,
        delim: u8,
    },
    Vector {
        elem: u32,
    },
    Composite(&'a [Attribute]),
    Hstore,
    /// Rendered as a JSON string: text, uuid, date (already XSD under DateStyle ISO), enums, ...
    Text,
}

/// PostgreSQL's `FirstNormalObjectId`: `json_categorize_type` looks for casts to json only above.
const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

const BOX_OID: u32 = 603;

/// Built-in array types: (array OID, element OID), sorted. From `pg_type` (PostgreSQL 15) where
/// `typlen = -1 AND typelem <> 0`, plus `_record` (2287) and `anyarray` (2277, whose element type
/// only the datum knows: 0 here, so elements render as strings). int2vector and oidvector are
/// separate ([`Kind::Vector`]). Composite element types (the catalogs' row types) are learned.
const BUILTIN_ARRAYS: &[(u32, u32)] = &[
    (143, 142),
    (199, 114),
    (210, 71),
    (270, 75),
    (271, 5069),
    (272, 81),
    (273, 83),
    (629, 628),
    (651, 650),
    (719, 718),
    (775, 774),
    (791, 790),
    (1000, 16),
    (1001, 17),
    (1002, 18),
    (1003, 19),
    (1005, 21),
    (1006, 22),
    (1007, 23),
    (1008, 24),
    (1009, 25),
    (1010, 27),
    (1011, 28),
    (1012, 29),
    (1013, 30),
    (1014, 1042),
    (1015, 1043),
    (1016, 20),
    (1017, 600),
    (1018, 601),
    (1019, 602),
    (1020, 603),
    (1021, 700),
    (1022, 701),
    (1027, 604),
    (1028, 26),
    (1034, 1033),
    (1040, 829),
    (1041, 869),
    (1115, 1114),
    (1182, 1082),
    (1183, 1083),
    (1185, 1184),
    (1187, 1186),
    (1231, 1700),
    (1263, 2275),
    (1270, 1266),
    (1561, 1560),
    (1563, 1562),
    (2201, 1790),
    (2207, 2202),
    (2208, 2203),
    (2209, 2204),
    (2210, 2205),
    (2211, 2206),
    (2277, 0),
    (2287, 2249),
    (2949, 2970),
    (2951, 2950),
    (3221, 3220),
    (3643, 3614),
    (3644, 3642),
    (3645, 3615),
    (3735, 3734),
    (3770, 3769),
    (3807, 3802),
    (3905, 3904),
    (3907, 3906),
    (3909, 3908),
    (3911, 3910),
    (3913, 3912),
    (3927, 3926),
    (4073, 4072),
    (4090, 4089),
    (4097, 4096),
    (4192, 4191),
    (5039, 5038),
    (6150, 4451),
    (6151, 4532),
    (6152, 4533),
    (6153, 4534),
    (6155, 4535),
    (6157, 4536),
];

/// Built-in non-array, non-composite types whose JSON is their text as a string, sorted. Note that
/// `oid`, `money` and the `reg*` types are strings for `to_json()` even though their
/// `typcategory` is N. `0` (no type) is here too.
const BUILTIN_TEXT: &[u32] = &[
    0, 17, 18, 19, 24, 25, 26, 27, 28, 29, 32, 142, 194, 269, 325, 600, 601, 602, 603, 604, 628,
    650, 705, 718, 774, 790, 829, 869, 1033, 1042, 1043, 1082, 1083, 1186, 1266, 1560, 1562, 1790,
    2202, 2203, 2204, 2205, 2206, 2249, 2275, 2276, 2278, 2279, 2280, 2281, 2283, 2776, 2950, 2970,
    3115, 3220, 3310, 3361, 3402, 3500, 3614, 3615, 3642, 3734, 3769, 3831, 3838, 3904, 3906, 3908,
    3910, 3912, 3926, 4072, 4089, 4096, 4191, 4451, 4532, 4533, 4534, 4535, 4536, 4537, 4538, 4600,
    4601, 5017, 5038, 5069, 5077, 5078, 5079, 5080,
];

fn builtin(oid: u32) -> Option<Kind<'static>> {
    Some(match oid {
        16 => Kind::Bool,
        20 | 21 | 23 | 700 | 701 | 1700 => Kind::Number,
        114 | 3802 => Kind::Json,
        1114 => Kind::Timestamp,
        1184 => Kind::TimestampTz,
        22 => Kind::Vector { elem: 21 },
        30 => Kind::Vector { elem: 26 },
        _ => {
            if let Ok(i) = BUILTIN_ARRAYS.binary_search_by_key(&oid, |&(a, _)| a) {
                let elem = BUILTIN_ARRAYS[i].1;
                let delim = if elem == BOX_OID { b';' } else { b',' };
                Kind::Array { elem, delim }
            } else if BUILTIN_TEXT.binary_search(&oid).is_ok() {
                Kind::Text
            } else {
                return None;
            }
        }
    })
}

/// Every type OID the codec can meet, with what `to_json()` needs to know about it.
///
/// Built-in types are always known. Others are learned from the catalog of the database the
/// values come from, with this loop (run it before rendering a result whose column types may be
/// user-defined; the SQL API does it per RowDescription, the change stream per Relation message):
///
/// ```text
/// loop {
///     let missing = registry.missing(&column_type_oids);
///     if missing.is_empty() { break; }
///     let rows = simple_query(&TypeRegistry::catalog_query(&missing))?;  // text rows
///     registry.absorb(&rows)?;
/// }
/// ```
///
/// [`catalog_query`](Self::catalog_query) already follows element, base and attribute types
/// recursively and answers a row even for an OID that does not exist, so the loop normally ends
/// after one round; a bound of a few rounds guards against types created concurrently.
/// When a type may have changed (`ALTER TYPE`, a pgoutput Type message), [`forget`](Self::forget)
/// it and run the loop again. Values of types that stay unknown render as JSON strings.
#[derive(Clone, Debug, Default)]
pub struct TypeRegistry {
    learned: HashMap<u32, LearnedType>,
}

impl TypeRegistry {
    /// A registry that knows the built-in types.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `oid` is built in or has been learned.
    pub fn is_known(&self, oid: u32) -> bool {
        builtin(oid).is_some() || self.learned.contains_key(&oid)
    }

    /// Drops what was learned about `oid` (so that the next [`missing`](Self::missing) asks again).
    pub fn forget(&mut self, oid: u32) {
        self.learned.remove(&oid);
    }

    /// The OIDs among `oids`, and among the element, base and attribute types of the known ones
    /// (transitively), that are not known yet; sorted, without duplicates.
    pub fn missing(&self, oids: &[u32]) -> Vec<u32> {
        let mut seen = HashSet::new();
        let mut stack: Vec<u32> = oids.to_vec();
        let mut missing = Vec::new();
        while let Some(oid) = stack.pop() {
            if !seen.insert(oid) {
                continue;
            }
            if let Some(kind) = builtin(oid) {
                if let Kind::Array { elem, .. } | Kind::Vector { elem } = kind {
                    stack.push(elem);
                }
                continue;
            }
            match self.learned.get(&oid).map(|t| &t.kind) {
                None => missing.push(oid),
                Some(LearnedKind::Domain { base }) => stack.push(*base),
                Some(LearnedKind::Array { elem }) => stack.push(*elem),
                Some(LearnedKind::Composite { attrs }) => {
                    stack.extend(attrs.iter().map(|a| a.type_oid));
                }
                Some(LearnedKind::Hstore | LearnedKind::Text) => {}
            }
        }
        missing.sort_unstable();
        missing
    }

    /// One self-contained SQL text (no bind parameters; for the simple query protocol) that
    /// describes the types `oids` and, recursively, their element, base and attribute types.
    ///
    /// It returns one row per type, every column as text, in this order (what
    /// [`absorb`](Self::absorb) expects): `oid`, `typname`, `typtype`, `typcategory`, `typelem`,
    /// `typbasetype`, `typdelim`, `typrelid`, `typlen`, `attributes` (composites: a JSON array of
    /// `[name, type_oid]` in `attnum` order without dropped attributes, else NULL), `json_cast`
    /// (the name of the function of a cast to `json`, if any). An OID that is not in `pg_type`
    /// gets a row with NULL in every column but the first.
    pub fn catalog_query(oids: &[u32]) -> String {
        let mut list = String::new();
        for (i, oid) in oids.iter().enumerate() {
            if i > 0 {
                list.push(',');
            }
            let _ = write!(list, "{oid}");
        }
        format!(
            "WITH RECURSIVE wanted(oid) AS (\
             \n    SELECT o::pg_catalog.oid FROM pg_catalog.unnest('{{{list}}}'::pg_catalog.int8[]) AS u(o)\
             \n  UNION\
             \n    SELECT dep.oid FROM wanted w\
             \n    JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) w.oid\
             \n    CROSS JOIN LATERAL (\
             \n        SELECT t.typelem WHERE t.typelem OPERATOR(pg_catalog.<>) 0\
             \n        UNION ALL SELECT t.typbasetype WHERE t.typbasetype OPERATOR(pg_catalog.<>) 0\
             \n        UNION ALL SELECT a.atttypid FROM pg_catalog.pg_attribute a\
             \n            WHERE t.typrelid OPERATOR(pg_catalog.<>) 0 AND a.attrelid OPERATOR(pg_catalog.=) t.typrelid AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped\
             \n    ) AS dep(oid)\
             \n)\
             \nSELECT w.oid::pg_catalog.text, t.typname::pg_catalog.text, t.typtype::pg_catalog.text,\
             \n    t.typcategory::pg_catalog.text, t.typelem::pg_catalog.text, t.typbasetype::pg_catalog.text,\
             \n    t.typdelim::pg_catalog.text, t.typrelid::pg_catalog.text, t.typlen::pg_catalog.text,\
             \n    (SELECT pg_catalog.json_agg(pg_catalog.json_build_array(a.attname, a.atttypid::pg_catalog.int8) ORDER BY a.attnum)\
             \n        FROM pg_catalog.pg_attribute a\
             \n        WHERE t.typtype OPERATOR(pg_catalog.=) 'c' AND a.attrelid OPERATOR(pg_catalog.=) t.typrelid AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped\
             \n    )::pg_catalog.text,\
             \n    (SELECT p.proname::pg_catalog.text FROM pg_catalog.pg_cast c\
             \n        JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) c.castfunc\
             \n        WHERE c.castsource OPERATOR(pg_catalog.=) t.oid AND c.casttarget OPERATOR(pg_catalog.=) 'pg_catalog.json'::pg_catalog.regtype\
             \n          AND c.castmethod OPERATOR(pg_catalog.=) 'f'\
             \n        LIMIT 1)\
             \nFROM wanted w LEFT JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) w.oid\
             \nORDER BY w.oid"
        )
    }

    /// Learns from the text rows of [`catalog_query`](Self::catalog_query). Built-in types in the
    /// rows are skipped (what is compiled in wins). On error nothing is learned.
    pub fn absorb(&mut self, rows: &[Vec<Option<String>>]) -> Result<(), ValueError> {
        let mut learned = Vec::with_capacity(rows.len());
        for (row, cols) in rows.iter().enumerate() {
            let bad = |reason: String| ValueError::Catalog { row, reason };
            if cols.len() != 11 {
                return Err(bad(format!("expected 11 columns, got {}", cols.len())));
            }
            let col = |i: usize| cols[i].as_deref();
            let oid_col = |i: usize, name: &str| -> Result<u32, ValueError> {
                let text = col(i).ok_or_else(|| bad(format!("{name} is NULL")))?;
                text.parse::<u32>()
                    .map_err(|_| bad(format!("{name} is not an OID: {text:?}")))
            };
            let oid = oid_col(0, "oid")?;
            let Some(typtype) = col(2) else {
                // Not in pg_type (dropped meanwhile): remember it as text so the loop ends.
                learned.push((
                    oid,
                    LearnedType {
                        kind: LearnedKind::Text,
                        delim: b',',
                        name: "unknown".to_string(),
                    },
                ));
                continue;
            };
            let elem = oid_col(4, "typelem")?;
            let base = oid_col(5, "typbasetype")?;
            let delim = match col(6).map(str::as_bytes) {
                Some([d]) => *d,
                other => return Err(bad(format!("typdelim is not one byte: {other:?}"))),
            };
            let typlen: i32 = col(8)
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad(format!("typlen is not an integer: {:?}", col(8))))?;
            let kind = match typtype {
                "d" => LearnedKind::Domain { base },
                "c" => LearnedKind::Composite {
                    attrs: parse_attributes(col(9)).map_err(bad)?,
                },
                _ if elem != 0 && typlen == -1 => LearnedKind::Array { elem },
                _ if oid >= FIRST_NORMAL_OBJECT_ID && col(10) == Some("hstore_to_json") => {
                    LearnedKind::Hstore
                }
                _ => LearnedKind::Text,
            };
            let name = col(1).unwrap_or("unknown").to_string();
            learned.push((oid, LearnedType { kind, delim, name }));
        }
        for (oid, ty) in learned {
            if builtin(oid).is_none() {
                self.learned.insert(oid, ty);
            }
        }
        Ok(())
    }

    /// The type's name as a column shows it: `int4`, `text[]`, a user type's `typname`;
    /// `unknown` for a type neither built in nor learned.
    pub fn type_name(&self, oid: u32) -> String {
        if let Ok(i) = crate::type_names::BUILTIN_TYPE_NAMES.binary_search_by_key(&oid, |&(o, _)| o)
        {
            return crate::type_names::BUILTIN_TYPE_NAMES[i].1.to_string();
        }
        match self.learned.get(&oid) {
            Some(LearnedType {
                kind: LearnedKind::Array { elem },
                ..
            }) if *elem != oid => format!("{}[]", self.type_name_shallow(*elem)),
            Some(t) => t.name.clone(),
            None => "unknown".to_string(),
        }
    }

    fn type_name_shallow(&self, oid: u32) -> String {
        match crate::type_names::BUILTIN_TYPE_NAMES.binary_search_by_key(&oid, |&(o, _)| o) {
            Ok(i) => crate::type_names::BUILTIN_TYPE_NAMES[i].1.to_string(),
            Err(_) => self
                .learned
                .get(&oid)
                .map_or_else(|| "unknown".to_string(), |t| t.name.clone()),
        }
    }

    fn delim(&self, oid: u32) -> u8 {
        match self.learned.get(&oid) {
            Some(t) => t.delim,
            None if oid == BOX_OID => b';',
            None => b',',
        }
    }

    /// The `to_json()` category of `oid`, following domains. Unknown types are [`Kind::Text`].
    fn resolve(&self, mut oid: u32) -> Kind<'_> {
        for _ in 0..MAX_DEPTH {
            if let Some(kind) = builtin(oid) {
                return kind;
            }
            let Some(ty) = self.learned.get(&oid) else {
                return Kind::Text;
            };
            match &ty.kind {
                LearnedKind::Domain { base } => oid = *base,
                LearnedKind::Array { elem } => {
                    return Kind::Array {
                        elem: *elem,
                        delim: self.delim(*elem),
                    }
                }
                LearnedKind::Composite { attrs } => return Kind::Composite(attrs),
                LearnedKind::Hstore => return Kind::Hstore,
                LearnedKind::Text => return Kind::Text,
            }
        }
        Kind::Text
    }
}

fn parse_attributes(text: Option<&str>) -> Result<Vec<Attribute>, String> {
    let Some(text) = text else {
        // A composite without live attributes (all dropped): `()`.
        return Ok(Vec::new());
    };
    let pairs: Vec<(String, u32)> = serde_json::from_str(text)
        .map_err(|e| format!("attributes are not [[name, oid], ...]: {e}"))?;
    Ok(pairs
        .into_iter()
        .map(|(name, type_oid)| Attribute { name, type_oid })
        .collect())
}

/// Appends to `out` the JSON that `to_json(value)::text` prints for the value of type `type_oid`
/// whose text output is `text` (`None` for SQL NULL). See the module docs for the rules.
pub fn write_json(out: &mut String, type_oid: u32, text: Option<&str>, reg: &TypeRegistry) {
    match text {
        None => out.push_str("null"),
        Some(text) => write_value(out, type_oid, text, reg, 0),
    }
}

/// The bytes [`write_json`] would append, counted without writing them (memory: the value's
/// largest element, never its JSON). A value's JSON can be far longer than its text: a
/// composite writes every attribute's name (`(,,)` of a type with long names becomes
/// kilobytes), arrays quote their elements, booleans spell `true`.
pub fn json_len(type_oid: u32, text: Option<&str>, reg: &TypeRegistry) -> usize {
    let mut measure = Measure(0);
    match text {
        None => measure.push_str("null"),
        Some(text) => write_value(&mut measure, type_oid, text, reg, 0),
    }
    measure.0
}

/// Whether a value of `type_oid` is written as a JSON string of its text ([`json_len`] is then
/// the text's length with quotes and escapes, which the caller can count without parsing).
pub fn renders_as_string(type_oid: u32, reg: &TypeRegistry) -> bool {
    matches!(reg.resolve(type_oid), Kind::Text)
}

/// Whether a value of `type_oid` can be written at most six bytes per byte of its text plus a
/// few bytes (an escaped control character, `\u0001`, is the most): everything but a
/// composite, or an array of composites, whose attribute names are written per value.
pub fn renders_within_six_times(type_oid: u32, reg: &TypeRegistry) -> bool {
    let mut kind = reg.resolve(type_oid);
    for _ in 0..MAX_DEPTH {
        match kind {
            Kind::Composite(_) => return false,
            Kind::Array { elem, .. } | Kind::Vector { elem } => kind = reg.resolve(elem),
            _ => return true,
        }
    }
    false
}

/// Where the renderer writes: a `String`, or a [`Measure`] that only counts.
trait Out: std::fmt::Write {
    fn push(&mut self, c: char);
    fn push_str(&mut self, s: &str);
    fn len(&self) -> usize;
    fn truncate(&mut self, len: usize);
    fn reserve(&mut self, additional: usize);
}

impl Out for String {
    fn push(&mut self, c: char) {
        String::push(self, c)
    }
    fn push_str(&mut self, s: &str) {
        String::push_str(self, s)
    }
    fn len(&self) -> usize {
        String::len(self)
    }
    fn truncate(&mut self, len: usize) {
        String::truncate(self, len)
    }
    fn reserve(&mut self, additional: usize) {
        String::reserve(self, additional)
    }
}

/// Counts what would be written ([`json_len`]).
struct Measure(usize);

impl std::fmt::Write for Measure {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

impl Out for Measure {
    fn push(&mut self, c: char) {
        self.0 += c.len_utf8();
    }
    fn push_str(&mut self, s: &str) {
        self.0 += s.len();
    }
    fn len(&self) -> usize {
        self.0
    }
    fn truncate(&mut self, len: usize) {
        self.0 = self.0.min(len);
    }
    fn reserve(&mut self, _: usize) {}
}

/// [`write_json`] parsed into a [`serde_json::Value`]. Without serde_json's `arbitrary_precision`
/// feature, numbers beyond `i64`/`u64`/`f64` precision lose digits here: prefer [`write_json`].
/// A document nested deeper than serde_json's recursion limit (128) comes back as a string.
pub fn to_json_value(type_oid: u32, text: Option<&str>, reg: &TypeRegistry) -> Value {
    let mut out = String::new();
    write_json(&mut out, type_oid, text, reg);
    serde_json::from_str(&out).unwrap_or_else(|_| Value::String(text.unwrap_or("").to_owned()))
}

/// The text does not have the shape its type prints: the caller writes it as a string instead.
struct Malformed;

/// How the values of one column are written as JSON ([`write_json`]), with a built-in type's
/// category looked up once instead of for every value (a change stream writes every column of
/// every row). A type of the database's own is still resolved through the registry at each
/// value: what the registry knows of it may change.
#[derive(Clone, Copy, Debug)]
pub struct ColumnWriter {
    oid: u32,
    builtin: Option<Kind<'static>>,
}

impl ColumnWriter {
    pub fn new(type_oid: u32) -> ColumnWriter {
        ColumnWriter {
            oid: type_oid,
            builtin: builtin(type_oid),
        }
    }

    /// [`write_json`] of a non-NULL value of this column.
    pub fn write(&self, out: &mut String, text: &str, reg: &TypeRegistry) {
        match self.builtin {
            Some(kind) => write_kind(out, kind, text, reg, 0),
            None => write_value(out, self.oid, text, reg, 0),
        }
    }
}

fn write_value<O: Out>(out: &mut O, oid: u32, text: &str, reg: &TypeRegistry, depth: usize) {
    write_kind(out, reg.resolve(oid), text, reg, depth);
}

fn write_kind<O: Out>(out: &mut O, kind: Kind<'_>, text: &str, reg: &TypeRegistry, depth: usize) {
    if depth > MAX_DEPTH {
        return write_string(out, text);
    }
    let start = out.len();
    let written = match kind {
        Kind::Bool if text == "t" || text == "f" => {
            out.push_str(if text == "t" { "true" } else { "false" });
            Ok(())
        }
        Kind::Number if is_json_number(text) => {
            out.push_str(text);
            Ok(())
        }
        Kind::Json if is_valid_json(text) => {
            out.push_str(text);
            Ok(())
        }
        Kind::Timestamp => write_xsd_timestamp(out, text, false),
        Kind::TimestampTz => write_xsd_timestamp(out, text, true),
        Kind::Array { elem, delim } => write_array(out, text, elem, delim, reg, depth),
        Kind::Vector { elem } => {
            out.push('[');
            let elem = reg.resolve(elem);
            for (i, item) in text.split(' ').filter(|s| !s.is_empty()).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_kind(out, elem, item, reg, depth + 1);
            }
            out.push(']');
            Ok(())
        }
        Kind::Composite(attrs) => write_composite(out, text, attrs, reg, depth),
        Kind::Hstore => write_hstore(out, text),
        Kind::Bool | Kind::Number | Kind::Json | Kind::Text => Err(Malformed),
    };
    if written.is_err() {
        out.truncate(start);
        write_string(out, text);
    }
}

/// A JSON string, escaped like PostgreSQL's `escape_json` (which serde_json parses identically).
fn write_string<O: Out>(out: &mut O, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = next_escape(bytes, 0);
    while i < bytes.len() {
        let b = bytes[i];
        // `i` is at an ASCII byte: a character boundary.
        out.push_str(&s[start..i]);
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            _ => "",
        };
        if escaped.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
        i = next_escape(bytes, start);
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Whether a byte must be escaped in a JSON string: a control character, `"` or `\`.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// The position of the first byte at or after `from` that must be escaped (`bytes.len()` if
/// none). Eight bytes at a time while none does (a row's text columns are mostly long runs of
/// plain text: byte by byte this was the largest part of rendering a wide row), then byte by
/// byte. The word tests are exact as booleans: "some byte below 0x20" is
/// `(x - 0x20..) & !x & 0x80..` (a byte at or above 0x80 never counts), "some byte equal to c"
/// is the same test for zero on `x ^ c..`.
fn next_escape(bytes: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut i = from;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        let quote = zero_byte(x ^ (ONES * u64::from(b'"')));
        let backslash = zero_byte(x ^ (ONES * u64::from(b'\\')));
        if control | quote | backslash != 0 {
            break;
        }
        i += 8;
    }
    while i < bytes.len() && !needs_escape(bytes[i]) {
        i += 1;
    }
    i
}

/// PostgreSQL's `IsValidJsonNumber`: an optional `-`, then the JSON number grammar, nothing else.
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let sign = usize::from(b.first() == Some(&b'-'));
    scan_json_number(b, sign) == Some(b.len())
}

/// Scans the JSON number (without its sign) starting at `i`; returns where it ends.
fn scan_json_number(b: &[u8], mut i: usize) -> Option<usize> {
    let digits = |b: &[u8], mut i: usize| {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        (i > start).then_some(i)
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(b, i)?,
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        i = digits(b, i + 1)?;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        i = digits(b, i)?;
    }
    Some(i)
}

/// Whether `s` is one JSON document (RFC 8259, which is what PostgreSQL's json parser accepts,
/// including its surrogate-pair checks). Iterative: nesting depth costs heap, not stack.
fn is_valid_json(s: &str) -> bool {
    let b = s.as_bytes();
    let ws = |i: &mut usize| {
        while matches!(b.get(*i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            *i += 1;
        }
    };
    let mut stack: Vec<u8> = Vec::new();
    let mut i = 0;
    'value: loop {
        ws(&mut i);
        match b.get(i) {
            Some(b'{') => {
                i += 1;
                ws(&mut i);
                if b.get(i) == Some(&b'}') {
                    i += 1;
                } else {
                    stack.push(b'{');
                    match scan_json_string(b, i) {
                        Some(end) => i = end,
                        None => return false,
                    }
                    ws(&mut i);
                    if b.get(i) != Some(&b':') {
                        return false;
                    }
                    i += 1;
                    continue 'value;
                }
            }
            Some(b'[') => {
                i += 1;
                ws(&mut i);
                if b.get(i) == Some(&b']') {
                    i += 1;
                } else {
                    stack.push(b'[');
                    continue 'value;
                }
            }
            Some(b'"') => match scan_json_string(b, i) {
                Some(end) => i = end,
                None => return false,
            },
            Some(b't') if b[i..].starts_with(b"true") => i += 4,
            Some(b'f') if b[i..].starts_with(b"false") => i += 5,
            Some(b'n') if b[i..].starts_with(b"null") => i += 4,
            Some(b'-') => match scan_json_number(b, i + 1) {
                Some(end) => i = end,
                None => return false,
            },
            Some(b'0'..=b'9') => match scan_json_number(b, i) {
                Some(end) => i = end,
                None => return false,
            },
            _ => return false,
        }
        // After a value: close containers or move on to the next member.
        loop {
            ws(&mut i);
            match (stack.last(), b.get(i)) {
                (None, None) => return true,
                (None, Some(_)) => return false,
                (Some(b'['), Some(b']')) | (Some(b'{'), Some(b'}')) => {
                    stack.pop();
                    i += 1;
                }
                (Some(b'['), Some(b',')) => {
                    i += 1;
                    continue 'value;
                }
                (Some(_), Some(b',')) => {
                    i += 1;
                    ws(&mut i);
                    match scan_json_string(b, i) {
                        Some(end) => i = end,
                        None => return false,
                    }
                    ws(&mut i);
                    if b.get(i) != Some(&b':') {
                        return false;
                    }
                    i += 1;
                    continue 'value;
                }
                _ => return false,
            }
        }
    }
}

/// Scans a JSON string starting at the quote at `i`; returns the index after its closing quote.
fn scan_json_string(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    i += 1;
    let hex4 = |i: usize| -> Option<u32> {
        let h = b.get(i..i + 4)?;
        let h = std::str::from_utf8(h).ok()?;
        if !h.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(h, 16).ok()
    };
    loop {
        match *b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' => {
                    let cp = hex4(i + 2)?;
                    i += 6;
                    if (0xd800..0xdc00).contains(&cp) {
                        if b.get(i..i + 2) != Some(b"\\u") {
                            return None;
                        }
                        let low = hex4(i + 2)?;
                        if !(0xdc00..0xe000).contains(&low) {
                            return None;
                        }
                        i += 6;
                    } else if (0xdc00..0xe000).contains(&cp) {
                        return None;
                    }
                }
                _ => return None,
            },
            0..=0x1f => return None,
            _ => i += 1,
        }
    }
}

/// `2020-01-02 03:04:05.6[+05:30][ BC]` (DateStyle ISO) to the XSD form `to_json()` prints:
/// `T` between date and time, and a zone offset with at least minutes (`+00` → `+00:00`).
fn write_xsd_timestamp<O: Out>(out: &mut O, text: &str, with_zone: bool) -> Result<(), Malformed> {
    if text == "infinity" || text == "-infinity" {
        return Err(Malformed); // written as the string it is
    }
    let b = text.as_bytes();
    let digits = |i: usize, n: usize| -> Result<usize, Malformed> {
        let end = i.checked_add(n).ok_or(Malformed)?;
        match b.get(i..end) {
            Some(d) if d.iter().all(u8::is_ascii_digit) => Ok(end),
            _ => Err(Malformed),
        }
    };
    let byte = |i: usize, c: u8| -> Result<usize, Malformed> {
        (b.get(i) == Some(&c)).then_some(i + 1).ok_or(Malformed)
    };
    // Date: year of four or more digits, month, day.
    let mut i = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if i < 4 {
        return Err(Malformed);
    }
    i = digits(byte(i, b'-')?, 2)?;
    i = digits(byte(i, b'-')?, 2)?;
    let date_end = i;
    // Time: hh:mm:ss[.fraction].
    i = digits(byte(date_end, b' ')?, 2)?;
    i = digits(byte(i, b':')?, 2)?;
    i = digits(byte(i, b':')?, 2)?;
    if b.get(i) == Some(&b'.') {
        let n = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return Err(Malformed);
        }
        i += 1 + n;
    }
    let time_end = i;
    // Zone: +hh[:mm[:ss]], kept as (sign and hours, minutes, seconds).
    let mut zone = None;
    if with_zone {
        if !matches!(b.get(i), Some(b'+' | b'-')) {
            return Err(Malformed);
        }
        let hours_end = digits(i + 1, 2)?;
        let sign_hours = &text[i..hours_end];
        i = hours_end;
        let mut minutes = "00";
        let mut seconds = None;
        if b.get(i) == Some(&b':') {
            let end = digits(i + 1, 2)?;
            minutes = &text[i + 1..end];
            i = end;
            if b.get(i) == Some(&b':') {
                let end = digits(i + 1, 2)?;
                seconds = Some(&text[i + 1..end]);
                i = end;
            }
        }
        zone = Some((sign_hours, minutes, seconds));
    }
    let era = &text[i..];
    if !era.is_empty() && era != " BC" {
        return Err(Malformed);
    }
    out.push('"');
    out.push_str(&text[..date_end]);
    out.push('T');
    out.push_str(&text[date_end + 1..time_end]);
    if let Some((sign_hours, minutes, seconds)) = zone {
        out.push_str(sign_hours);
        out.push(':');
        out.push_str(minutes);
        if let Some(seconds) = seconds {
            out.push(':');
            out.push_str(seconds);
        }
    }
    out.push_str(era);
    out.push('"');
    Ok(())
}

/// Reads one quoted array element starting after its opening quote into `buf`; returns the
/// index after the closing quote. Inside quotes, a backslash escapes the next character.
fn read_quoted(text: &str, mut i: usize, buf: &mut String) -> Result<usize, Malformed> {
    buf.clear();
    let b = text.as_bytes();
    let mut start = i;
    loop {
        match b.get(i) {
            None => return Err(Malformed),
            Some(b'"') => {
                buf.push_str(&text[start..i]);
                return Ok(i + 1);
            }
            Some(b'\\') => {
                buf.push_str(&text[start..i]);
                let c = text[i + 1..].chars().next().ok_or(Malformed)?;
                buf.push(c);
                i += 1 + c.len_utf8();
                start = i;
            }
            Some(_) => i += 1,
        }
    }
}

/// An array's text output (`array_out`) as nested JSON arrays. The optional dimension decoration
/// (`[0:1]=`) is skipped; elements are `NULL`, unquoted, or double-quoted with backslash escapes.
fn write_array<O: Out>(
    out: &mut O,
    text: &str,
    elem: u32,
    delim: u8,
    reg: &TypeRegistry,
    depth: usize,
) -> Result<(), Malformed> {
    let b = text.as_bytes();
    let open = text.find('{').ok_or(Malformed)?;
    if open > 0 && !(b[0] == b'[' && b[open - 1] == b'=') {
        return Err(Malformed);
    }
    #[derive(PartialEq)]
    enum Expect {
        /// After `{`: an element, a nested `{`, or `}` (empty).
        First,
        /// After a delimiter: an element or a nested `{`.
        Next,
        /// After an element or a nested `}`: a delimiter or `}`.
        DelimOrClose,
    }
    let elem = reg.resolve(elem);
    let mut level = 0usize;
    let mut expect = Expect::Next;
    let mut buf = String::new();
    let mut i = open;
    while i < b.len() {
        let c = b[i];
        match c {
            b'{' if expect != Expect::DelimOrClose => {
                level += 1;
                out.push('[');
                expect = Expect::First;
                i += 1;
            }
            b'}' if expect != Expect::Next => {
                level = level.checked_sub(1).ok_or(Malformed)?;
                out.push(']');
                expect = Expect::DelimOrClose;
                i += 1;
                if level == 0 {
                    return if i == b.len() { Ok(()) } else { Err(Malformed) };
                }
            }
            _ if c == delim && expect == Expect::DelimOrClose => {
                out.push(',');
                expect = Expect::Next;
                i += 1;
            }
            b'"' if expect != Expect::DelimOrClose && level > 0 => {
                i = read_quoted(text, i + 1, &mut buf)?;
                write_kind(out, elem, &buf, reg, depth + 1);
                expect = Expect::DelimOrClose;
            }
            _ if expect != Expect::DelimOrClose && level > 0 => {
                let len = b[i..]
                    .iter()
                    .position(|&x| x == delim || x == b'}')
                    .ok_or(Malformed)?;
                let item = &text[i..i + len];
                if item.is_empty() {
                    return Err(Malformed);
                }
                if item.contains(['{', '"', '\\']) {
                    return Err(Malformed);
                }
                if item.eq_ignore_ascii_case("NULL") {
                    out.push_str("null");
                } else {
                    write_kind(out, elem, item, reg, depth + 1);
                }
                expect = Expect::DelimOrClose;
                i += len;
            }
            _ => return Err(Malformed),
        }
    }
    Err(Malformed)
}

/// A composite's text output (`record_out`) as a JSON object keyed by attribute name. Follows
/// `record_in`: an empty field is NULL, `""` is an empty string; inside quotes `""` is a quote;
/// a backslash escapes the next character anywhere.
fn write_composite<O: Out>(
    out: &mut O,
    text: &str,
    attrs: &[Attribute],
    reg: &TypeRegistry,
    depth: usize,
) -> Result<(), Malformed> {
    let b = text.as_bytes();
    if b.first() != Some(&b'(') {
        return Err(Malformed);
    }
    let mut i = 1;
    let mut buf = String::new();
    out.push('{');
    for (n, attr) in attrs.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        write_string(out, &attr.name);
        out.push(':');
        let end = if n + 1 == attrs.len() { b')' } else { b',' };
        if b.get(i) == Some(&end) {
            out.push_str("null");
            i += 1;
            continue;
        }
        buf.clear();
        let mut quoted = false;
        let mut start = i;
        loop {
            match b.get(i) {
                None => return Err(Malformed),
                Some(b'\\') => {
                    buf.push_str(&text[start..i]);
                    let c = text[i + 1..].chars().next().ok_or(Malformed)?;
                    buf.push(c);
                    i += 1 + c.len_utf8();
                    start = i;
                }
                Some(b'"') => {
                    buf.push_str(&text[start..i]);
                    if quoted && b.get(i + 1) == Some(&b'"') {
                        buf.push('"');
                        i += 2;
                    } else {
                        quoted = !quoted;
                        i += 1;
                    }
                    start = i;
                }
                Some(&c) if !quoted && (c == b',' || c == b')') => {
                    if c != end {
                        return Err(Malformed);
                    }
                    buf.push_str(&text[start..i]);
                    i += 1;
                    break;
                }
                Some(_) => i += 1,
            }
        }
        write_value(out, attr.type_oid, &buf, reg, depth + 1);
    }
    if attrs.is_empty() {
        if b.get(i) != Some(&b')') {
            return Err(Malformed);
        }
        i += 1;
    }
    if i != b.len() {
        return Err(Malformed);
    }
    out.push('}');
    Ok(())
}

/// hstore's text output (`"k"=>"v", "k2"=>NULL`) as `hstore_to_json` renders it: every value a
/// string or null.
fn write_hstore<O: Out>(out: &mut O, text: &str) -> Result<(), Malformed> {
    let b = text.as_bytes();
    let ws = |i: &mut usize| {
        while b.get(*i).is_some_and(u8::is_ascii_whitespace) {
            *i += 1;
        }
    };
    let mut i = 0;
    let mut buf = String::new();
    out.push('{');
    ws(&mut i);
    let mut first = true;
    while i < b.len() {
        if !first {
            if b[i] != b',' {
                return Err(Malformed);
            }
            i += 1;
            out.push(',');
            ws(&mut i);
        }
        first = false;
        if b.get(i) != Some(&b'"') {
            return Err(Malformed);
        }
        i = read_quoted(text, i + 1, &mut buf)?;
        write_string(out, &buf);
        out.push(':');
        ws(&mut i);
        if !b[i..].starts_with(b"=>") {
            return Err(Malformed);
        }
        i += 2;
        ws(&mut i);
        if b.get(i) == Some(&b'"') {
            i = read_quoted(text, i + 1, &mut buf)?;
            write_string(out, &buf);
        } else if b
            .get(i..i + 4)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"NULL"))
        {
            i += 4;
            out.push_str("null");
        } else {
            return Err(Malformed);
        }
        ws(&mut i);
    }
    out.push('}');
    Ok(())
}

/// The PostgreSQL text input for the JSON request parameter `value`, whose type PostgreSQL
/// inferred as `type_oid`; `None` is SQL NULL.
///
/// * `null` → NULL.
/// * json/jsonb (and domains over them): the JSON text of any value (a string becomes a JSON
///   string, `"a"` → `"\"a\""`).
/// * `true`/`false` → `true`/`false`; a number → its text; a string → as is (so a string can
///   always carry PostgreSQL's own literal, e.g. `"{1,2}"` or `"(1,x)"`).
/// * An array for an array type → an array literal, every element quoted and escaped, `null` →
///   `NULL`, elements converted by the element type. Nested JSON arrays are further dimensions,
///   except for element types that take arrays as values (json/jsonb: `[[1,2]]` for `jsonb[]` is
///   one element `[1,2]`, so 2-D jsonb arrays must be given as a string literal).
/// * An object for a composite type → a row literal by attribute name (missing keys are NULL,
///   unknown keys an error); for hstore → an hstore literal.
/// * Any other array or object → its JSON text.
///
/// Nothing here checks that the text is valid input for the type: PostgreSQL's input function
/// does, and the server reports its error naming the parameter.
pub fn param_to_text(
    value: &Value,
    type_oid: u32,
    reg: &TypeRegistry,
) -> Result<Option<String>, ValueError> {
    let text = param_text(value, type_oid, reg, 0)?;
    if text.as_deref().is_some_and(|t| t.contains('\0')) {
        return Err(ValueError::NulCharacter);
    }
    Ok(text)
}

fn param_text(
    value: &Value,
    oid: u32,
    reg: &TypeRegistry,
    depth: usize,
) -> Result<Option<String>, ValueError> {
    if depth > MAX_DEPTH {
        return Err(ValueError::TooDeep);
    }
    let kind = reg.resolve(oid);
    Ok(Some(match (value, kind) {
        (Value::Null, _) => return Ok(None),
        (_, Kind::Json) => value.to_string(),
        (Value::Bool(b), _) => b.to_string(),
        (Value::Number(n), _) => n.to_string(),
        (Value::String(s), _) => s.clone(),
        (Value::Array(items), Kind::Array { elem, delim }) => {
            let elem_takes_arrays = matches!(
                reg.resolve(elem),
                Kind::Json | Kind::Array { .. } | Kind::Vector { .. }
            );
            let mut out = String::new();
            write_array_literal(&mut out, items, elem, delim, elem_takes_arrays, reg, depth)?;
            out
        }
        (Value::Object(map), Kind::Composite(attrs)) => {
            record_literal(map, oid, attrs, reg, depth)?
        }
        (Value::Object(map), Kind::Hstore) => hstore_literal(map, reg, depth)?,
        (Value::Array(_) | Value::Object(_), _) => value.to_string(),
    }))
}

/// Appends `s` double-quoted, with `"` and `\` backslash-escaped (valid in arrays, rows, hstore).
fn push_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

fn write_array_literal(
    out: &mut String,
    items: &[Value],
    elem: u32,
    delim: u8,
    elem_takes_arrays: bool,
    reg: &TypeRegistry,
    depth: usize,
) -> Result<(), ValueError> {
    if depth > MAX_DEPTH {
        return Err(ValueError::TooDeep);
    }
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(char::from(delim));
        }
        match item {
            Value::Array(sub) if !elem_takes_arrays => {
                write_array_literal(out, sub, elem, delim, elem_takes_arrays, reg, depth + 1)?;
            }
            _ => match param_text(item, elem, reg, depth + 1)? {
                None => out.push_str("NULL"),
                Some(text) => push_quoted(out, &text),
            },
        }
    }
    out.push('}');
    Ok(())
}

fn record_literal(
    map: &Map<String, Value>,
    type_oid: u32,
    attrs: &[Attribute],
    reg: &TypeRegistry,
    depth: usize,
) -> Result<String, ValueError> {
    if let Some(name) = map.keys().find(|k| !attrs.iter().any(|a| &a.name == *k)) {
        return Err(ValueError::UnknownAttribute {
            type_oid,
            name: name.clone(),
        });
    }
    let mut out = String::from("(");
    for (i, attr) in attrs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if let Some(value) = map.get(&attr.name) {
            if let Some(text) = param_text(value, attr.type_oid, reg, depth + 1)? {
                push_quoted(&mut out, &text);
            }
        }
    }
    out.push(')');
    Ok(out)
}

fn hstore_literal(
    map: &Map<String, Value>,
    reg: &TypeRegistry,
    depth: usize,
) -> Result<String, ValueError> {
    let mut out = String::new();
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push_quoted(&mut out, key);
        out.push_str("=>");
        match param_text(value, 25, reg, depth + 1)? {
            None => out.push_str("NULL"),
            Some(text) => push_quoted(&mut out, &text),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BOOL: u32 = 16;
    const INT2: u32 = 21;
    const INT4: u32 = 23;
    const INT8: u32 = 20;
    const TEXT: u32 = 25;
    const OID: u32 = 26;
    const FLOAT8: u32 = 701;
    const NUMERIC: u32 = 1700;
    const JSONB: u32 = 3802;
    const DATE: u32 = 1082;
    const TIMESTAMP: u32 = 1114;
    const TIMESTAMPTZ: u32 = 1184;
    const BOOL_ARRAY: u32 = 1000;
    const INT4_ARRAY: u32 = 1007;
    const TEXT_ARRAY: u32 = 1009;
    const JSONB_ARRAY: u32 = 3807;
    const BOX_ARRAY: u32 = 1020;

    // User types, as catalog_query would describe them.
    const MOOD: u32 = 90001;
    const MOOD_ARRAY: u32 = 90002;
    const PAIR: u32 = 90003;
    const PAIR_ARRAY: u32 = 90004;
    const POSINT: u32 = 90005;
    const NESTED: u32 = 90006;
    const HSTORE: u32 = 90007;
    const DOC: u32 = 90008;

    fn row(cols: &[Option<&str>]) -> Vec<Option<String>> {
        cols.iter().map(|c| c.map(str::to_owned)).collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn type_row(
        oid: u32,
        typtype: &str,
        elem: u32,
        base: u32,
        delim: &str,
        typlen: i32,
        attrs: Option<&str>,
        cast: Option<&str>,
    ) -> Vec<Option<String>> {
        let (oid, elem, base, typlen) = (
            oid.to_string(),
            elem.to_string(),
            base.to_string(),
            typlen.to_string(),
        );
        row(&[
            Some(&oid),
            Some("t"),
            Some(typtype),
            Some("U"),
            Some(&elem),
            Some(&base),
            Some(delim),
            Some("0"),
            Some(&typlen),
            attrs,
            cast,
        ])
    }

    fn registry() -> TypeRegistry {
        let mut reg = TypeRegistry::new();
        reg.absorb(&[
            type_row(MOOD, "e", 0, 0, ",", 4, None, None),
            type_row(MOOD_ARRAY, "b", MOOD, 0, ",", -1, None, None),
            type_row(
                PAIR,
                "c",
                0,
                0,
                ",",
                -1,
                Some(r#"[["a", 23], ["b", 25]]"#),
                None,
            ),
            type_row(PAIR_ARRAY, "b", PAIR, 0, ",", -1, None, None),
            type_row(POSINT, "d", 0, INT4, ",", 4, None, None),
            type_row(
                NESTED,
                "c",
                0,
                0,
                ",",
                -1,
                Some(r#"[["p", 90003], ["tags", 1009], ["m", 90002], ["n", 90005], ["at", 1184]]"#),
                None,
            ),
            type_row(HSTORE, "b", 0, 0, ",", -1, None, Some("hstore_to_json")),
            type_row(DOC, "d", 0, 0, ",", -1, None, None),
        ])
        .unwrap();
        // DOC is a domain over jsonb: fix its base (type_row's base is 0 above on purpose
        // to test that learning again replaces the entry).
        reg.absorb(&[type_row(DOC, "d", 0, JSONB, ",", -1, None, None)])
            .unwrap();
        reg
    }

    fn render(oid: u32, text: &str) -> String {
        let mut out = String::new();
        write_json(&mut out, oid, Some(text), &registry());
        out
    }

    /// Renders, checks the output is valid JSON, and returns it parsed.
    fn value(oid: u32, text: &str) -> Value {
        let out = render(oid, text);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out:?} is not JSON: {e}"))
    }

    #[test]
    fn null_is_null_whatever_the_type() {
        let mut out = String::new();
        write_json(&mut out, INT4, None, &registry());
        write_json(&mut out, 123_456, None, &registry());
        assert_eq!(out, "nullnull");
    }

    #[test]
    fn numbers_keep_their_text() {
        for text in [
            "0",
            "-0",
            "9223372036854775807",
            "-9223372036854775808",
            "123456789012345678901234567890.123456789",
            "1e+20",
            "1.5e-07",
            "-1.25E3",
        ] {
            assert_eq!(render(NUMERIC, text), text);
        }
        assert_eq!(render(INT8, "9223372036854775807"), "9223372036854775807");
    }

    #[test]
    fn numbers_that_json_cannot_spell_are_strings() {
        for text in [
            "NaN",
            "Infinity",
            "-Infinity",
            "01",
            "1.",
            ".5",
            "+1",
            "1e",
            "-",
            "",
            "1 ",
        ] {
            assert_eq!(value(FLOAT8, text), json!(text), "{text:?}");
        }
    }

    #[test]
    fn bools_and_oids() {
        assert_eq!(render(BOOL, "t"), "true");
        assert_eq!(render(BOOL, "f"), "false");
        assert_eq!(value(BOOL, "true"), json!("true"));
        // to_json() prints oid (and money, regclass, ...) as strings.
        assert_eq!(render(OID, "12"), "\"12\"");
        assert_eq!(render(POSINT, "7"), "7");
    }

    #[test]
    fn strings_are_escaped_like_escape_json() {
        assert_eq!(
            render(TEXT, "a\"b\\c\nd\te\r\u{8}\u{c}\u{1}é✓"),
            r#""a\"b\\c\nd\te\r\b\f\u0001é✓""#
        );
        assert_eq!(render(123_456, "unknown type"), "\"unknown type\"");
    }

    #[test]
    fn every_byte_that_needs_escaping_is_found_at_every_place_in_a_word() {
        // Each special byte (and its neighbours in value: 0x1f/0x20, 0x21/0x22/0x23,
        // 0x5b/0x5c/0x5d, 0x7f, multi-byte characters) at every offset of texts longer than a
        // word, alone and in pairs: rendered exactly as serde_json escapes them.
        let specials = [
            "\u{0}", "\u{1}", "\u{8}", "\t", "\n", "\u{c}", "\r", "\u{1f}", " ", "!", "\"", "#",
            "[", "\\", "]", "\u{7f}", "é", "✓", "😀",
        ];
        for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 31] {
            for at in 0..=len {
                for a in specials {
                    for b in ["", "\"", "\u{1}", "é"] {
                        let text = format!("{}{a}{b}{}", "x".repeat(at), "y".repeat(len - at));
                        let mut out = String::new();
                        write_string(&mut out, &text);
                        assert_eq!(out, serde_json::to_string(&text).unwrap(), "{text:?}");
                    }
                }
            }
        }
        assert_eq!(next_escape(b"abcdefghijklmnop", 0), 16);
        assert_eq!(next_escape(b"abcdefghijklmno\"", 3), 15);
        assert_eq!(next_escape(b"\\bcdefghijklmnop", 1), 16);
    }

    #[test]
    fn json_is_embedded_as_is_when_valid() {
        for text in [
            r#"{"a": [1, 2.5e3, null, true, false, "x\"y\u00e9\ud83d\ude00"]}"#,
            "  [ ]  ",
            "\"s\"",
            "-0.5",
            "{}",
            r#"{"a":{"b":{"c":[[[]]]}}}"#,
        ] {
            assert!(serde_json::from_str::<Value>(text).is_ok());
            assert_eq!(render(JSONB, text), text);
            assert_eq!(render(DOC, text), text);
        }
        for text in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "01",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\x\"",
            "\"a\u{1}\"",
            "1 2",
            "nul",
            "[1]]",
            "{\"a\":1]",
        ] {
            assert!(serde_json::from_str::<Value>(text).is_err(), "{text:?}");
            assert_eq!(value(JSONB, text), json!(text), "{text:?}");
        }
    }

    #[test]
    fn deep_json_does_not_overflow_the_stack() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(is_valid_json(&deep));
        assert!(!is_valid_json(&deep[1..]));
    }

    #[test]
    fn dates_and_timestamps_in_xsd_form() {
        assert_eq!(render(DATE, "2020-01-02"), "\"2020-01-02\"");
        assert_eq!(render(DATE, "0044-03-15 BC"), "\"0044-03-15 BC\"");
        assert_eq!(render(DATE, "-infinity"), "\"-infinity\"");
        let cases = [
            (TIMESTAMP, "2020-01-02 03:04:05", "2020-01-02T03:04:05"),
            (TIMESTAMP, "2020-01-02 03:04:05.5", "2020-01-02T03:04:05.5"),
            (TIMESTAMP, "20000-01-01 10:00:00", "20000-01-01T10:00:00"),
            (
                TIMESTAMP,
                "0044-03-15 10:00:00 BC",
                "0044-03-15T10:00:00 BC",
            ),
            (TIMESTAMP, "infinity", "infinity"),
            (
                TIMESTAMPTZ,
                "2020-01-02 03:04:05+00",
                "2020-01-02T03:04:05+00:00",
            ),
            (
                TIMESTAMPTZ,
                "2020-01-02 03:04:05.123456+05:30",
                "2020-01-02T03:04:05.123456+05:30",
            ),
            (
                TIMESTAMPTZ,
                "1850-01-01 12:00:00-04:56:02",
                "1850-01-01T12:00:00-04:56:02",
            ),
            (
                TIMESTAMPTZ,
                "0044-03-15 10:00:00-04:56:02 BC",
                "0044-03-15T10:00:00-04:56:02 BC",
            ),
            (
                TIMESTAMPTZ,
                "2020-01-02 03:04:05-08 BC",
                "2020-01-02T03:04:05-08:00 BC",
            ),
            (TIMESTAMPTZ, "-infinity", "-infinity"),
            // Not DateStyle ISO: kept as is.
            (
                TIMESTAMPTZ,
                "28/11/2026 01:31:25 CET",
                "28/11/2026 01:31:25 CET",
            ),
            (TIMESTAMPTZ, "2020-01-02 03:04:05", "2020-01-02 03:04:05"),
            (
                TIMESTAMP,
                "2020-01-02 03:04:05+00",
                "2020-01-02 03:04:05+00",
            ),
            (TIMESTAMP, "2020-01-02 03:04:05.", "2020-01-02 03:04:05."),
            (TIMESTAMP, "202-01-02 03:04:05", "202-01-02 03:04:05"),
        ];
        for (oid, text, expected) in cases {
            assert_eq!(value(oid, text), json!(expected), "{text:?}");
        }
    }

    #[test]
    fn arrays_with_quotes_backslashes_delimiters_and_nulls() {
        assert_eq!(
            value(
                TEXT_ARRAY,
                r#"{"a\"b","c\\d","",NULL,"NULL",x,"{","}","a,b","x y",é}"#
            ),
            json!(["a\"b", "c\\d", "", null, "NULL", "x", "{", "}", "a,b", "x y", "é"])
        );
        assert_eq!(value(INT4_ARRAY, "{}"), json!([]));
        assert_eq!(value(INT4_ARRAY, "{1,NULL,-3}"), json!([1, null, -3]));
        assert_eq!(value(INT4_ARRAY, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(
            value(INT4_ARRAY, "[0:1][2:3]={{1,2},{3,4}}"),
            json!([[1, 2], [3, 4]])
        );
        assert_eq!(value(INT4_ARRAY, "{{{1}},{{2}}}"), json!([[[1]], [[2]]]));
        assert_eq!(value(BOOL_ARRAY, "{t,f,NULL}"), json!([true, false, null]));
        assert_eq!(
            value(1231, "{1.5,NaN,123456789012345678901234567890}"),
            serde_json::from_str::<Value>(r#"[1.5,"NaN",123456789012345678901234567890]"#).unwrap()
        );
        assert_eq!(
            render(1231, "{123456789012345678901234567890}"),
            "[123456789012345678901234567890]"
        );
        assert_eq!(
            value(BOX_ARRAY, "{(1,1),(0,0);(2,2),(1,1)}"),
            json!(["(1,1),(0,0)", "(2,2),(1,1)"])
        );
        assert_eq!(
            value(JSONB_ARRAY, r#"{"{\"a\": 1}",NULL,"[1, \"x\"]",5}"#),
            json!([{"a": 1}, null, [1, "x"], 5])
        );
        assert_eq!(
            value(1185, r#"{"2020-01-02 03:04:05+00",NULL}"#),
            json!(["2020-01-02T03:04:05+00:00", null])
        );
        assert_eq!(value(MOOD_ARRAY, "{happy,sad}"), json!(["happy", "sad"]));
        assert_eq!(value(22, "1 2"), json!([1, 2]));
        assert_eq!(value(30, "3 4"), json!(["3", "4"]));
        assert_eq!(value(22, ""), json!([]));
        assert_eq!(value(1006, r#"{"1 2","3"}"#), json!([[1, 2], [3]]));
    }

    #[test]
    fn malformed_arrays_are_strings() {
        for text in [
            "",
            "{",
            "}",
            "{1,2",
            "{1,2}}",
            "{1,2}x",
            "{,}",
            "{1,}",
            "{\"a}",
            "{\"a\\",
            "[0:1]{1,2}",
            "x={1}",
            "{a\"b}",
            "{{1},2,}",
            "{1}{2}",
        ] {
            assert_eq!(value(INT4_ARRAY, text), json!(text), "{text:?}");
        }
    }

    #[test]
    fn composites_become_objects() {
        assert_eq!(
            value(PAIR, r#"(1,"a ""b"" \\c")"#),
            json!({"a": 1, "b": "a \"b\" \\c"})
        );
        assert_eq!(value(PAIR, "(,)"), json!({"a": null, "b": null}));
        assert_eq!(value(PAIR, r#"(,"")"#), json!({"a": null, "b": ""}));
        assert_eq!(value(PAIR, r#"(2,"x,y)")"#), json!({"a": 2, "b": "x,y)"}));
        // Key order is the attribute order.
        assert_eq!(render(PAIR, "(1,x)"), r#"{"a":1,"b":"x"}"#);
        assert_eq!(
            value(
                NESTED,
                r#"("(1,""x y"")","{a,""b c"",NULL}","{happy}",5,"2020-01-02 03:04:05+00")"#
            ),
            json!({
                "p": {"a": 1, "b": "x y"},
                "tags": ["a", "b c", null],
                "m": ["happy"],
                "n": 5,
                "at": "2020-01-02T03:04:05+00:00",
            })
        );
        assert_eq!(
            value(PAIR_ARRAY, r#"{"(1,a)",NULL,"(,\"b \"\"c\"\"\")"}"#),
            json!([{"a": 1, "b": "a"}, null, {"a": null, "b": "b \"c\""}])
        );
        // Wrong number of fields (the type changed since it was learned): a string.
        for text in ["(1)", "(1,2,3)", "1,2", "(1,2", "(1,2))", ""] {
            assert_eq!(value(PAIR, text), json!(text), "{text:?}");
        }
    }

    #[test]
    fn hstore_renders_like_hstore_to_json() {
        assert_eq!(
            value(HSTORE, r#""a"=>"1", "n"=>"NULL", "b c"=>NULL, "q\\\""=>"""#),
            json!({"a": "1", "n": "NULL", "b c": null, "q\\\"": ""})
        );
        assert_eq!(value(HSTORE, ""), json!({}));
        assert_eq!(value(HSTORE, "\"a\"=>"), json!("\"a\"=>"));
    }

    #[test]
    fn output_is_valid_json_for_any_input() {
        // A small deterministic generator over the characters that matter to the parsers.
        let alphabet: Vec<char> = "{}()[]=,;\"\\ NULLtf0123456789.-+eE:TBCé\n\u{1}x"
            .chars()
            .collect();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let reg = registry();
        let oids = [
            BOOL,
            INT4,
            FLOAT8,
            NUMERIC,
            JSONB,
            DATE,
            TIMESTAMP,
            TIMESTAMPTZ,
            INT4_ARRAY,
            TEXT_ARRAY,
            JSONB_ARRAY,
            BOX_ARRAY,
            22,
            1006,
            MOOD_ARRAY,
            PAIR,
            PAIR_ARRAY,
            NESTED,
            HSTORE,
            DOC,
            POSINT,
        ];
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            for oid in oids {
                let mut out = String::new();
                write_json(&mut out, oid, Some(&text), &reg);
                assert!(
                    serde_json::from_str::<Value>(&out).is_ok(),
                    "type {oid}, text {text:?}: {out:?}"
                );
            }
        }
    }

    #[test]
    fn registry_reports_missing_types_transitively() {
        let mut reg = TypeRegistry::new();
        assert!(reg.missing(&[INT4, TEXT_ARRAY, 0, 2287]).is_empty());
        // _pg_type is built in, its element (the pg_type row type) is not.
        assert_eq!(reg.missing(&[210]), vec![71]);
        assert_eq!(reg.missing(&[NESTED, NESTED, INT4]), vec![NESTED]);
        reg.absorb(&[type_row(
            NESTED,
            "c",
            0,
            0,
            ",",
            -1,
            Some(r#"[["p", 90003], ["tags", 1009], ["m", 90002]]"#),
            None,
        )])
        .unwrap();
        assert_eq!(reg.missing(&[NESTED]), vec![MOOD_ARRAY, PAIR]);
        reg.absorb(&[type_row(MOOD_ARRAY, "b", MOOD, 0, ",", -1, None, None)])
            .unwrap();
        assert_eq!(reg.missing(&[NESTED]), vec![MOOD, PAIR]);
        // An OID the catalog does not know comes back with NULLs: learned as text.
        let mut gone = vec![None; 11];
        gone[0] = Some(MOOD.to_string());
        reg.absorb(&[gone]).unwrap();
        assert_eq!(reg.missing(&[NESTED]), vec![PAIR]);
        reg.forget(MOOD);
        assert_eq!(reg.missing(&[NESTED]), vec![MOOD, PAIR]);
        assert!(reg.is_known(INT4) && reg.is_known(NESTED) && !reg.is_known(PAIR));
    }

    #[test]
    fn absorb_refuses_malformed_rows_and_learns_nothing() {
        let mut reg = TypeRegistry::new();
        let good = type_row(MOOD, "e", 0, 0, ",", 4, None, None);
        let mut bad_oid = good.clone();
        bad_oid[0] = Some("x".into());
        let mut bad_delim = good.clone();
        bad_delim[6] = Some(",,".into());
        let mut bad_attrs = type_row(PAIR, "c", 0, 0, ",", -1, Some("{}"), None);
        let short = good[..5].to_vec();
        for rows in [
            vec![good.clone(), bad_oid],
            vec![bad_delim],
            vec![short],
            vec![std::mem::take(&mut bad_attrs)],
        ] {
            assert!(matches!(reg.absorb(&rows), Err(ValueError::Catalog { .. })));
        }
        assert!(!reg.is_known(MOOD));
        // Built-ins are never overridden by catalog rows.
        reg.absorb(&[type_row(INT4, "b", 0, 0, ",", 4, None, None)])
            .unwrap();
        assert_eq!(render(INT4, "5"), "5");
    }

    #[test]
    fn catalog_query_inlines_oids() {
        let sql = TypeRegistry::catalog_query(&[16385, 4_294_967_295]);
        assert!(sql.contains("'{16385,4294967295}'::pg_catalog.int8[]"));
        assert!(!sql.contains('$'));
    }

    #[test]
    fn builtin_tables_are_sorted() {
        assert!(BUILTIN_ARRAYS.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(BUILTIN_TEXT.windows(2).all(|w| w[0] < w[1]));
    }

    fn param(value: Value, oid: u32) -> Option<String> {
        param_to_text(&value, oid, &registry()).unwrap()
    }

    #[test]
    fn scalar_params() {
        assert_eq!(param(json!(null), INT4), None);
        assert_eq!(param(json!(null), JSONB), None);
        assert_eq!(param(json!(true), BOOL).as_deref(), Some("true"));
        assert_eq!(param(json!(false), TEXT).as_deref(), Some("false"));
        assert_eq!(param(json!(-12), INT2).as_deref(), Some("-12"));
        assert_eq!(
            param(json!(18_446_744_073_709_551_615_u64), NUMERIC).as_deref(),
            Some("18446744073709551615")
        );
        assert_eq!(param(json!(1.5), FLOAT8).as_deref(), Some("1.5"));
        assert_eq!(param(json!("a'b\\c"), TEXT).as_deref(), Some("a'b\\c"));
        assert_eq!(param(json!("{1,2}"), INT4_ARRAY).as_deref(), Some("{1,2}"));
        assert_eq!(param(json!([1, 2]), TEXT).as_deref(), Some("[1,2]"));
        assert_eq!(param(json!({"a": 1}), TEXT).as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(param(json!(5), POSINT).as_deref(), Some("5"));
    }

    #[test]
    fn json_params_are_json_text() {
        assert_eq!(param(json!("a"), JSONB).as_deref(), Some("\"a\""));
        assert_eq!(param(json!(1), JSONB).as_deref(), Some("1"));
        assert_eq!(param(json!(false), 114).as_deref(), Some("false"));
        assert_eq!(
            param(json!({"a": [1, null]}), DOC).as_deref(),
            Some(r#"{"a":[1,null]}"#)
        );
    }

    #[test]
    fn array_params_quote_every_element() {
        assert_eq!(
            param(
                json!(["a\"b", "c\\d", "", null, "NULL", "x,y", "{}", " "]),
                TEXT_ARRAY
            )
            .as_deref(),
            Some(r#"{"a\"b","c\\d","",NULL,"NULL","x,y","{}"," "}"#)
        );
        assert_eq!(param(json!([]), INT4_ARRAY).as_deref(), Some("{}"));
        assert_eq!(
            param(json!([[1, 2], [3, null]]), INT4_ARRAY).as_deref(),
            Some(r#"{{"1","2"},{"3",NULL}}"#)
        );
        assert_eq!(
            param(json!(["(1,1),(0,0)", "(2,2),(1,1)"]), BOX_ARRAY).as_deref(),
            Some(r#"{"(1,1),(0,0)";"(2,2),(1,1)"}"#)
        );
        // jsonb elements: JSON text, arrays are values (not a second dimension).
        assert_eq!(
            param(json!([{"a": "x\"y"}, [1, 2], "s", null]), JSONB_ARRAY).as_deref(),
            Some(r#"{"{\"a\":\"x\\\"y\"}","[1,2]","\"s\"",NULL}"#)
        );
        assert_eq!(
            param(json!([{"a": 1, "b": "x"}, null]), PAIR_ARRAY).as_deref(),
            Some(r#"{"(\"1\",\"x\")",NULL}"#)
        );
    }

    #[test]
    fn array_params_round_trip_through_the_renderer() {
        let reg = registry();
        for (value, oid) in [
            (
                json!(["a\"b", "c\\d", "", null, "NULL", "x,y", "{", "}", " ", "é\n"]),
                TEXT_ARRAY,
            ),
            (json!([[1, 2], [3, null]]), INT4_ARRAY),
            (json!([[[1]], [[-2]]]), INT4_ARRAY),
            (
                json!([{"a": [1, "x\\\""]}, [1], "s", 2.5, null]),
                JSONB_ARRAY,
            ),
            (
                json!([{"a": 1, "b": "(x, \"y\")"}, null, {"a": null, "b": ""}]),
                PAIR_ARRAY,
            ),
            (json!({"a": "1", "b c": null, "q\\\"": ""}), HSTORE),
            (
                json!({"p": {"a": 1, "b": "x y"}, "tags": ["a", null], "m": ["happy"],
                       "n": 5, "at": "2020-01-02T03:04:05+00:00"}),
                NESTED,
            ),
        ] {
            let text = param_to_text(&value, oid, &reg).unwrap();
            let mut out = String::new();
            write_json(&mut out, oid, text.as_deref(), &reg);
            let mut expected = value.clone();
            if oid == NESTED {
                // Timestamps come back as PostgreSQL prints them, not as given.
                expected["at"] = json!("2020-01-02T03:04:05+00:00");
            }
            assert_eq!(
                serde_json::from_str::<Value>(&out).unwrap(),
                expected,
                "{text:?}"
            );
        }
    }

    #[test]
    fn composite_params_by_attribute_name() {
        assert_eq!(
            param(json!({"b": "x\"y", "a": 1}), PAIR).as_deref(),
            Some(r#"("1","x\"y")"#)
        );
        assert_eq!(param(json!({}), PAIR).as_deref(), Some("(,)"));
        assert_eq!(
            param_to_text(&json!({"c": 1}), PAIR, &registry()),
            Err(ValueError::UnknownAttribute {
                type_oid: PAIR,
                name: "c".into()
            })
        );
    }

    #[test]
    fn params_refuse_nul_and_excessive_depth() {
        assert_eq!(
            param_to_text(&json!("a\u{0}b"), TEXT, &registry()),
            Err(ValueError::NulCharacter)
        );
        let mut deep = json!(1);
        for _ in 0..(MAX_DEPTH + 2) {
            deep = json!([deep]);
        }
        assert_eq!(
            param_to_text(&deep, INT4_ARRAY, &registry()),
            Err(ValueError::TooDeep)
        );
    }

    /// The `values` fuzz target's check (`replication/fuzz`) in a deterministic, bounded form
    /// that runs with every `cargo test`: PostgreSQL's own output (the fuzz target's seed corpus,
    /// `replication/fuzz/seeds/values/`), mutated and as random text, rendered as every kind of
    /// type the codec parses. Never a panic, and always one valid JSON document; and a mutation
    /// that is a JSON document goes through `param_to_text` without a panic.
    #[test]
    fn random_and_mutated_values_never_panic_and_render_json() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/values");
        let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
            .collect();
        seeds.sort();
        assert!(
            seeds.len() >= 30,
            "only {} seeds in {}",
            seeds.len(),
            dir.display()
        );
        let types = [
            BOOL,
            INT2,
            INT4,
            INT8,
            700,
            FLOAT8,
            NUMERIC,
            114,
            JSONB,
            DATE,
            TIMESTAMP,
            TIMESTAMPTZ,
            TEXT,
            OID,
            22,
            30,
            BOOL_ARRAY,
            INT4_ARRAY,
            TEXT_ARRAY,
            JSONB_ARRAY,
            BOX_ARRAY,
            1185,
            1231,
            3904,
            3910,
            3905,
            4451,
            MOOD,
            MOOD_ARRAY,
            PAIR,
            PAIR_ARRAY,
            POSINT,
            NESTED,
            HSTORE,
            DOC,
        ];
        let reg = registry();
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as usize
        };
        let special = b"{}()[]\"\\,;=>: -+.eE019tfNULnulTZBC\n\x00\xc3\xa9\xff";
        let mut out = String::new();
        for _ in 0..20_000 {
            let mut input: Vec<u8> = if next() % 8 == 0 {
                (0..next() % 48)
                    .map(|_| special[next() % special.len()])
                    .collect()
            } else {
                seeds[next() % seeds.len()].clone()
            };
            for _ in 0..=next() % 4 {
                let at = next() % (input.len() + 1);
                match next() % 5 {
                    0 if at < input.len() => input[at] = special[next() % special.len()],
                    1 if at < input.len() => {
                        input.remove(at);
                    }
                    2 => input.truncate(at),
                    3 => {
                        // Splice in a piece of another seed (nesting, e.g. an array in an array).
                        let other = &seeds[next() % seeds.len()];
                        let from = next() % (other.len() + 1);
                        let to = from + next() % (other.len() - from + 1);
                        input.splice(at..at, other[from..to].iter().copied());
                    }
                    _ => input.insert(at, special[next() % special.len()]),
                }
            }
            let text = String::from_utf8_lossy(&input);
            for oid in types {
                out.clear();
                write_json(&mut out, oid, Some(&text), &reg);
                assert!(
                    is_valid_json(&out)
                        && serde_json::from_str::<Box<serde_json::value::RawValue>>(&out).is_ok(),
                    "type {oid}: {text:?} rendered as {out:?}, which is not JSON"
                );
            }
            if let Ok(value) = serde_json::from_str::<Value>(&text) {
                for oid in types {
                    let _ = param_to_text(&value, oid, &reg);
                }
            }
        }
    }

    /// The measure is exactly what the renderer writes, for every shape (malformed text
    /// falling back to a string included), and it says which types can exceed six bytes per
    /// byte of text.
    #[test]
    fn the_measure_is_the_rendered_length() {
        let reg = registry();
        let cases: &[(u32, &str)] = &[
            (BOOL, "t"),
            (BOOL, "f"),
            (INT4, "42"),
            (NUMERIC, "NaN"),
            (TEXT, "a \"quoted\" \\ line\n\u{1}"),
            (JSONB, r#"{"a": [1, 2]}"#),
            (TIMESTAMPTZ, "2024-01-02 03:04:05.123+00"),
            (TIMESTAMP, "not a time"),
            (BOOL_ARRAY, "{t,f,NULL,t}"),
            (TEXT_ARRAY, r#"{a,"b c","d\"e",NULL}"#),
            (INT4_ARRAY, "[0:1]={1,2}"),
            (PAIR, r#"(1,"a ""b"" \\c")"#),
            (PAIR, "(,)"),
            (PAIR_ARRAY, r#"{"(1,x)","(,)",NULL}"#),
            (NESTED, "broken"),
            (HSTORE, r#""a"=>"1", "b c"=>NULL"#),
            (MOOD_ARRAY, "{happy,sad}"),
        ];
        for (oid, text) in cases {
            assert_eq!(
                json_len(*oid, Some(text), &reg),
                render(*oid, text).len(),
                "{oid} {text:?}"
            );
        }
        assert_eq!(json_len(TEXT, None, &reg), 4);
        // Empty attributes of a composite cost their names.
        assert!(json_len(PAIR, Some("(,)"), &reg) > 6 * "(,)".len());
        for oid in [PAIR, PAIR_ARRAY, NESTED] {
            assert!(!renders_within_six_times(oid, &reg), "{oid}");
        }
        for oid in [
            BOOL, TEXT, BOOL_ARRAY, TEXT_ARRAY, JSONB, HSTORE, MOOD_ARRAY,
        ] {
            assert!(renders_within_six_times(oid, &reg), "{oid}");
        }
        assert!(renders_as_string(TEXT, &reg) && renders_as_string(MOOD, &reg));
        assert!(!renders_as_string(BOOL, &reg) && !renders_as_string(TEXT_ARRAY, &reg));
    }
}

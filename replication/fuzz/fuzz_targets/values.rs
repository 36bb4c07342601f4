//! Arbitrary bytes as the text output of every kind of type the value codec parses (arrays,
//! composites, hstore, json, timestamps, vectors, ranges, numbers, and domains and arrays of
//! user types learned through `TypeRegistry::absorb`): `write_json` must never panic and must
//! always write one valid JSON document (a value it cannot parse becomes a JSON string). When the
//! bytes are a JSON document, `param_to_text` (the other direction) must not panic either.
#![no_main]

use fluxbase_replication::values::{param_to_text, write_json, TypeRegistry};
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use std::sync::OnceLock;

/// Built-in types: bool, int2, int4, int8, float4, float8, numeric, json, jsonb, date, timestamp,
/// timestamptz, text, int2vector, oidvector, bool[], int4[], text[], jsonb[], box[] (delimiter
/// `;`), timestamptz[], numeric[], int4range, tstzrange, int4range[], int4multirange, uuid, bytea.
const BUILTIN: &[u32] = &[
    16, 21, 23, 20, 700, 701, 1700, 114, 3802, 1082, 1114, 1184, 25, 22, 30, 1000, 1007, 1009,
    3807, 1020, 1185, 1231, 3904, 3910, 3905, 4451, 2950, 17,
];

/// User types (OIDs above 16384), as `TypeRegistry::catalog_query` would describe them.
const USER: &[u32] = &[
    90001, 90002, 90003, 90004, 90005, 90006, 90007, 90008, 90009, 90010,
];

fn registry() -> &'static TypeRegistry {
    static REG: OnceLock<TypeRegistry> = OnceLock::new();
    REG.get_or_init(|| {
        let row = |oid: u32, typtype: &str, elem: u32, base: u32, delim: &str, typlen: i32,
                   attrs: Option<&str>, cast: Option<&str>| {
            vec![
                Some(oid.to_string()),
                Some("t".to_owned()),
                Some(typtype.to_owned()),
                Some("U".to_owned()),
                Some(elem.to_string()),
                Some(base.to_string()),
                Some(delim.to_owned()),
                Some("0".to_owned()),
                Some(typlen.to_string()),
                attrs.map(str::to_owned),
                cast.map(str::to_owned),
            ]
        };
        let mut reg = TypeRegistry::new();
        reg.absorb(&[
            // enum mood, mood[]
            row(90001, "e", 0, 0, ",", 4, None, None),
            row(90002, "b", 90001, 0, ",", -1, None, None),
            // composite pair (a int4, b text), pair[]
            row(90003, "c", 0, 0, ",", -1, Some(r#"[["a", 23], ["b", 25]]"#), None),
            row(90004, "b", 90003, 0, ",", -1, None, None),
            // domain posint over int4
            row(90005, "d", 0, 23, ",", 4, None, None),
            // composite nesting a composite, arrays, a domain and a timestamptz
            row(
                90006,
                "c",
                0,
                0,
                ",",
                -1,
                Some(r#"[["p", 90003], ["tags", 1009], ["m", 90002], ["n", 90005], ["at", 1184], ["r", 3904]]"#),
                None,
            ),
            // hstore
            row(90007, "b", 0, 0, ",", -1, None, Some("hstore_to_json")),
            // domain over jsonb
            row(90008, "d", 0, 3802, ",", -1, None, None),
            // a base type with delimiter `;` and its array
            row(90009, "b", 0, 0, ";", -1, None, None),
            row(90010, "b", 90009, 0, ",", -1, None, None),
        ])
        .expect("the fuzz target's catalog rows are well formed");
        reg
    })
}

fuzz_target!(|data: &[u8]| {
    let reg = registry();
    let text = String::from_utf8_lossy(data);
    let mut out = String::new();
    for &oid in BUILTIN.iter().chain(USER) {
        out.clear();
        write_json(&mut out, oid, Some(&text), reg);
        // IgnoredAny scans iteratively and does not convert numbers: no recursion or range limit.
        if let Err(e) = serde_json::from_str::<IgnoredAny>(&out) {
            panic!("type {oid}: {text:?} rendered as {out:?}, which is not JSON: {e}");
        }
    }
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) {
        for &oid in BUILTIN.iter().chain(USER) {
            let _ = param_to_text(&value, oid, reg);
        }
    }
});

//! Object names in events, written the way PostgreSQL writes them.
//!
//! DDL events carry PostgreSQL's own object identity (`pg_event_trigger_ddl_commands()
//! .object_identity`), which quotes each part with `quote_identifier()`: plain when the part is
//! lower-case letters, digits and `_` (not starting with a digit) and not a keyword other than an
//! unreserved one; otherwise in double quotes with `"` doubled. Every other name an event
//! carries (a TRUNCATE's `object`, a partition's) is written with the same rules here, so that
//! one table has one name in every event: `public."Order Items"`, `public.orders`.
//! See <https://www.postgresql.org/docs/current/sql-keywords-appendix.html>.

/// PostgreSQL's keywords that `quote_identifier()` quotes (every category but unreserved):
/// `SELECT word FROM pg_get_keywords() WHERE catcode <> 'U'` on PostgreSQL 15, the version the
/// server embeds. Sorted, for the binary search.
const QUOTED_KEYWORDS: [&str; 151] = [
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "between",
    "bigint",
    "binary",
    "bit",
    "boolean",
    "both",
    "case",
    "cast",
    "char",
    "character",
    "check",
    "coalesce",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "dec",
    "decimal",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "exists",
    "extract",
    "false",
    "fetch",
    "float",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "greatest",
    "group",
    "grouping",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "inout",
    "int",
    "integer",
    "intersect",
    "interval",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "least",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "national",
    "natural",
    "nchar",
    "none",
    "normalize",
    "not",
    "notnull",
    "null",
    "nullif",
    "numeric",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "out",
    "outer",
    "overlaps",
    "overlay",
    "placing",
    "position",
    "precision",
    "primary",
    "real",
    "references",
    "returning",
    "right",
    "row",
    "select",
    "session_user",
    "setof",
    "similar",
    "smallint",
    "some",
    "substring",
    "symmetric",
    "table",
    "tablesample",
    "then",
    "time",
    "timestamp",
    "to",
    "trailing",
    "treat",
    "trim",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "values",
    "varchar",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
    "xmlattributes",
    "xmlconcat",
    "xmlelement",
    "xmlexists",
    "xmlforest",
    "xmlnamespaces",
    "xmlparse",
    "xmlpi",
    "xmlroot",
    "xmlserialize",
    "xmltable",
];

/// One identifier as PostgreSQL's `quote_ident()` writes it.
pub fn quote_ident(name: &str) -> String {
    let plain = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && QUOTED_KEYWORDS.binary_search(&name).is_err();
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// `schema.name`, each part quoted as PostgreSQL does (`quote_qualified_identifier()`).
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// The parts of a dotted, quoted name such as an object identity (`public."a.b".c`), unquoted.
/// `None` when it is not one (an unterminated quote, an empty part).
pub fn split_identity(identity: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = identity.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c);
                chars.next();
            }
            if part.is_empty() {
                return None;
            }
        }
        parts.push(part);
        match chars.next() {
            None => return Some(parts),
            Some('.') => continue,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_as_postgresql_quotes_them() {
        assert_eq!(quote_ident("orders"), "orders");
        assert_eq!(quote_ident("_t2"), "_t2");
        assert_eq!(quote_ident("Order Items"), "\"Order Items\"");
        assert_eq!(quote_ident("Orders"), "\"Orders\"");
        assert_eq!(quote_ident("2fa"), "\"2fa\"");
        assert_eq!(quote_ident("a.b"), "\"a.b\"");
        assert_eq!(quote_ident("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(quote_ident("café"), "\"café\"");
        assert_eq!(quote_ident("a$b"), "\"a$b\"");
        assert_eq!(quote_ident(""), "\"\"");
        // Reserved and other non-unreserved keywords are quoted; unreserved ones are not.
        assert_eq!(quote_ident("user"), "\"user\"");
        assert_eq!(quote_ident("order"), "\"order\"");
        assert_eq!(quote_ident("int"), "\"int\"");
        assert_eq!(quote_ident("data"), "data");
        assert_eq!(quote_ident("name"), "name");
        assert_eq!(qualified("public", "Order Items"), "public.\"Order Items\"");
        assert!(QUOTED_KEYWORDS.windows(2).all(|w| w[0] < w[1]), "sorted");
    }

    #[test]
    fn identities_split_into_their_unquoted_parts() {
        let split = |s: &str| split_identity(s).map(|v| v.join("|"));
        assert_eq!(split("public.orders").as_deref(), Some("public|orders"));
        assert_eq!(
            split("\"My Schema\".\"a.b\".c").as_deref(),
            Some("My Schema|a.b|c")
        );
        assert_eq!(
            split("public.\"say \"\"hi\"\"\"").as_deref(),
            Some("public|say \"hi\"")
        );
        for name in ["Order Items", "a.b", "x\"y", "café", "user", "plain"] {
            let q = qualified("s p", name);
            assert_eq!(split_identity(&q), Some(vec!["s p".into(), name.into()]));
        }
        assert_eq!(split("public.\"open"), None);
        assert_eq!(split("public..x"), None);
        assert_eq!(split("\"a\"b"), None);
    }
}

//! Policy expressions from developers: lexed (strings, quoted identifiers, dollar quotes,
//! comments, as PostgreSQL's lexical structure has them) and checked to be one balanced
//! expression, so that input like `true) WITH CHECK (false` cannot reshape the `CREATE POLICY`
//! around it; a `;` or a `)` that would close the `USING (…)` is refused. PostgreSQL's parser
//! is the last word.
//!
//! *Once per statement*: every `auth.uid()` call becomes `(SELECT auth.uid())`, which
//! PostgreSQL evaluates once as an InitPlan instead of once per row (`EXPLAIN` shows it).

use super::RlsError;

/// A policy expression from a developer, checked to be one balanced expression, with every
/// `auth.uid()` wrapped as `(SELECT auth.uid())`.
#[derive(Debug, PartialEq, Eq)]
pub struct Expression {
    /// As given (shown by the list).
    pub original: String,
    /// What goes between the parentheses of `USING (…)` / `WITH CHECK (…)`.
    pub sql: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Word,
    QuotedIdent,
    Literal,
    Comment,
    Punct(u8),
    Other,
}

#[derive(Debug)]
struct Token {
    kind: TokenKind,
    start: usize,
    end: usize,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// The index just past a token quoted with `quote` whose first quote is at or after `from`
/// (`'…'` literals with a prefix such as `B'`, `U&"…"` identifiers), where a doubled quote
/// stands for itself; None when it never ends.
fn past_doubled_quotes(s: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut i = from + s[from..].iter().position(|&c| c == quote)? + 1;
    loop {
        match *s.get(i)? {
            c if c == quote && s.get(i + 1) == Some(&quote) => i += 2,
            c if c == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
}
/// PostgreSQL's lexical structure, as far as it matters here: where strings, quoted
/// identifiers, dollar quotes and comments begin and end (with `standard_conforming_strings` on,
/// which the policy transaction sets), and everything else as words and punctuation.
fn lex(text: &str, field: &str) -> Result<Vec<Token>, RlsError> {
    let s = text.as_bytes();
    let unterminated = |what: &str| RlsError::Invalid(format!("{field}: unterminated {what}"));
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let start = i;
        let b = s[i];
        let at = |k: usize| s.get(k).copied().unwrap_or(0);
        let kind = if b.is_ascii_whitespace() {
            i += 1;
            continue;
        } else if b == b'-' && at(i + 1) == b'-' {
            while i < s.len() && s[i] != b'\n' && s[i] != b'\r' {
                i += 1;
            }
            TokenKind::Comment
        } else if b == b'/' && at(i + 1) == b'*' {
            let mut depth = 0;
            loop {
                if i + 1 >= s.len() {
                    return Err(unterminated("comment"));
                }
                if s[i] == b'/' && s[i + 1] == b'*' {
                    depth += 1;
                    i += 2;
                } else if s[i] == b'*' && s[i + 1] == b'/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            TokenKind::Comment
        } else if b == b'\'' || (matches!(b, b'e' | b'E') && at(i + 1) == b'\'') {
            let escapes = b != b'\'';
            i += if escapes { 2 } else { 1 };
            loop {
                match s.get(i) {
                    None => return Err(unterminated("string literal")),
                    Some(b'\\') if escapes => i += 2,
                    Some(b'\'') if at(i + 1) == b'\'' => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            TokenKind::Literal
        } else if matches!(b, b'b' | b'B' | b'x' | b'X' | b'n' | b'N') && at(i + 1) == b'\''
            || matches!(b, b'u' | b'U') && at(i + 1) == b'&' && at(i + 2) == b'\''
        {
            i = past_doubled_quotes(s, i, b'\'').ok_or_else(|| unterminated("string literal"))?;
            TokenKind::Literal
        } else if b == b'"' || (matches!(b, b'u' | b'U') && at(i + 1) == b'&' && at(i + 2) == b'"')
        {
            i = past_doubled_quotes(s, i, b'"').ok_or_else(|| unterminated("quoted identifier"))?;
            TokenKind::QuotedIdent
        } else if b == b'$' && !at(i + 1).is_ascii_digit() {
            // A dollar quote: $tag$ … $tag$ (the tag may be empty).
            let mut j = i + 1;
            while j < s.len() && is_ident_char(s[j]) && s[j] != b'$' {
                j += 1;
            }
            if at(j) != b'$' || (j > i + 1 && !is_ident_start(s[i + 1])) {
                i += 1;
                TokenKind::Other
            } else {
                let tag = &s[i..=j];
                match s[j + 1..].windows(tag.len()).position(|w| w == tag) {
                    Some(p) => i = j + 1 + p + tag.len(),
                    None => return Err(unterminated("dollar-quoted string")),
                }
                TokenKind::Literal
            }
        } else if is_ident_start(b) {
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            TokenKind::Word
        } else if b.is_ascii_digit() {
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'.' || s[i] == b'_') {
                i += 1;
            }
            TokenKind::Other
        } else if matches!(b, b'(' | b')' | b';' | b',' | b'.' | b'[' | b']') {
            i += 1;
            TokenKind::Punct(b)
        } else {
            // Operators and anything else: one byte (multi-byte UTF-8 stays whole).
            i += 1;
            while i < s.len() && (s[i] & 0xC0) == 0x80 {
                i += 1;
            }
            TokenKind::Other
        };
        tokens.push(Token {
            kind,
            start,
            end: i,
        });
    }
    Ok(tokens)
}

impl Expression {
    /// Checks `text` (the request's field `field`) and wraps its `auth.uid()` calls.
    pub fn parse(text: &str, field: &str) -> Result<Expression, RlsError> {
        if text.len() > 16 * 1024 || text.contains('\0') {
            return Err(RlsError::Invalid(format!(
                "{field}: expected an SQL expression of at most 16 KiB"
            )));
        }
        let tokens = lex(text, field)?;
        let code: Vec<&Token> = tokens
            .iter()
            .filter(|t| t.kind != TokenKind::Comment)
            .collect();
        if code.is_empty() {
            return Err(RlsError::Invalid(format!(
                "{field}: expected an SQL expression such as user_id = auth.uid()"
            )));
        }
        let mut depth = 0i32;
        for t in &code {
            match t.kind {
                TokenKind::Punct(b';') => {
                    return Err(RlsError::Invalid(format!(
                        "{field}: expected one SQL expression, found `;`"
                    )))
                }
                TokenKind::Punct(b'(') => depth += 1,
                TokenKind::Punct(b')') => {
                    depth -= 1;
                    if depth < 0 {
                        return Err(RlsError::Invalid(format!(
                            "{field}: expected one SQL expression, found an unmatched `)` at \
                             byte {}",
                            t.start
                        )));
                    }
                }
                _ => {}
            }
        }
        if depth != 0 {
            return Err(RlsError::Invalid(format!(
                "{field}: expected one SQL expression, found an unclosed `(`"
            )));
        }

        // Rebuild: comments become a space, `auth.uid()` becomes `(SELECT auth.uid())`.
        let name = |t: &Token| -> Option<String> {
            let raw = &text[t.start..t.end];
            match t.kind {
                TokenKind::Word => Some(raw.to_ascii_lowercase()),
                TokenKind::QuotedIdent if raw.starts_with('"') => {
                    Some(raw[1..raw.len() - 1].replace("\"\"", "\""))
                }
                _ => None,
            }
        };
        let is = |k: usize, p: u8| code.get(k).is_some_and(|t| t.kind == TokenKind::Punct(p));
        let mut sql = String::with_capacity(text.len() + 16);
        let mut copied = 0;
        let mut k = 0;
        while k < code.len() {
            let call = name(code[k]).as_deref() == Some("auth")
                && is(k + 1, b'.')
                && code.get(k + 2).and_then(|t| name(t)).as_deref() == Some("uid")
                && is(k + 3, b'(')
                && is(k + 4, b')');
            let after_select = k > 0 && name(code[k - 1]).as_deref() == Some("select");
            if call && !after_select {
                sql.push_str(&blank_comments(text, &tokens, copied, code[k].start));
                sql.push_str("(SELECT auth.uid())");
                copied = code[k + 4].end;
                k += 5;
            } else {
                k += 1;
            }
        }
        sql.push_str(&blank_comments(text, &tokens, copied, text.len()));
        Ok(Expression {
            original: text.to_string(),
            sql,
        })
    }
}

/// `text[from..to]` with its comments replaced by a space.
fn blank_comments(text: &str, tokens: &[Token], from: usize, to: usize) -> String {
    let mut out = String::with_capacity(to - from);
    let mut at = from;
    for t in tokens
        .iter()
        .filter(|t| t.kind == TokenKind::Comment && t.start >= from && t.end <= to)
    {
        out.push_str(&text[at..t.start]);
        out.push(' ');
        at = t.end;
    }
    out.push_str(&text[at..to]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrap(s: &str) -> String {
        Expression::parse(s, "using").unwrap().sql
    }

    fn refused(s: &str) -> String {
        match Expression::parse(s, "using") {
            Err(RlsError::Invalid(m)) => m,
            other => panic!("{s:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn auth_uid_calls_are_wrapped_once_per_statement() {
        assert_eq!(
            wrap("user_id = auth.uid()"),
            "user_id = (SELECT auth.uid())"
        );
        assert_eq!(
            wrap("org_id = AUTH . UID ( ) OR x = \"auth\".\"uid\"()"),
            "org_id = (SELECT auth.uid()) OR x = (SELECT auth.uid())"
        );
        assert_eq!(
            wrap("user_id::text = auth.uid()"),
            "user_id::text = (SELECT auth.uid())"
        );
        assert_eq!(wrap("a = (SELECT auth.uid())"), "a = (SELECT auth.uid())");
    }

    #[test]
    fn auth_uid_inside_literals_identifiers_and_comments_is_left_alone() {
        assert_eq!(wrap("note = 'auth.uid()'"), "note = 'auth.uid()'");
        assert_eq!(wrap("\"auth.uid()\" = 'x'"), "\"auth.uid()\" = 'x'");
        assert_eq!(wrap("x = $q$auth.uid()$q$"), "x = $q$auth.uid()$q$");
        assert_eq!(wrap("x = E'\\'auth.uid()'"), "x = E'\\'auth.uid()'");
        assert_eq!(wrap("true -- auth.uid()"), "true  ");
        assert_eq!(wrap("true /* a /* b */ ) */"), "true  ");
        assert_eq!(wrap("\"AUTH\".uid() = x"), "\"AUTH\".uid() = x");
    }

    #[test]
    fn anything_but_one_expression_is_refused() {
        assert!(refused("true) WITH CHECK (false").contains("unmatched `)`"));
        assert!(refused("true); DROP TABLE posts; --").contains("unmatched `)`"));
        assert!(refused("true; DROP TABLE posts").contains("`;`"));
        assert!(refused("(true").contains("unclosed"));
        assert!(refused("'unterminated").contains("unterminated"));
        assert!(refused("x = $a$ ) $b$").contains("unterminated"));
        assert!(refused("/* ) ").contains("unterminated"));
        assert!(refused("   -- only a comment").contains("expected an SQL expression"));
        // Inside literals a `)` or `;` is data.
        assert_eq!(wrap("x = ');' AND y = \")\""), "x = ');' AND y = \")\"");
    }
}

//! Script variables: the store, `:name` / `:'name'` / `:"name"` interpolation, and the
//! argument words of backslash commands.
//!
//! Owns the psql rules for how a variable's value enters text. Does not decide which variables
//! exist or when they change; the interpreter (`run`) does.

use std::collections::BTreeMap;

/// Named string values, set by `\set`, `-v` and the interpreter after every statement.
#[derive(Debug, Default, Clone)]
pub struct Vars {
    values: BTreeMap<String, String>,
}

impl Vars {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.values.insert(name.to_string(), value.into());
    }

    pub fn unset(&mut self, name: &str) {
        self.values.remove(name);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// psql's variable-name characters: ASCII letters, digits, `_`, and any non-ASCII character.
pub fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || !c.is_ascii()
}

/// A valid variable name: name characters, not starting with a digit.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if is_name_char(c) && !c.is_ascii_digit())
        && chars.all(is_name_char)
}

/// The value as an SQL string literal: `it's` becomes `'it''s'`. Backslashes are left alone,
/// which is right with `standard_conforming_strings` on (the PostgreSQL default).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The value as a quoted SQL identifier: `a"b` becomes `"a""b"`.
pub fn quote_ident(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

/// How a `:` reference found at the start of `rest` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    /// `:name`: the value as is.
    Plain,
    /// `:'name'`: the value as a string literal.
    Literal,
    /// `:"name"`: the value as an identifier.
    Ident,
}

/// Recognises a variable reference at the start of `rest`, which begins with `:`. Returns the
/// kind, the name and the length in bytes of the reference, or `None` when the text is not a
/// reference (`::`, `:=`, a lone colon, `:'unterminated`).
pub fn parse_ref(rest: &str) -> Option<(RefKind, &str, usize)> {
    let after = rest.strip_prefix(':')?;
    let (kind, body) = match after.chars().next()? {
        '\'' => (RefKind::Literal, &after[1..]),
        '"' => (RefKind::Ident, &after[1..]),
        c if is_name_char(c) && !c.is_ascii_digit() => (RefKind::Plain, after),
        _ => return None,
    };
    let name_len = body
        .char_indices()
        .find(|&(_, c)| !is_name_char(c))
        .map_or(body.len(), |(i, _)| i);
    let name = &body[..name_len];
    if !is_valid_name(name) {
        return None;
    }
    match kind {
        RefKind::Plain => Some((kind, name, 1 + name_len)),
        RefKind::Literal | RefKind::Ident => {
            let close = if kind == RefKind::Literal { '\'' } else { '"' };
            body[name_len..]
                .starts_with(close)
                .then_some((kind, name, 1 + 1 + name_len + 1))
        }
    }
}

/// The text a reference stands for, or `None` for an unknown variable: like psql, the caller
/// then leaves the reference as written.
pub fn expand_ref(kind: RefKind, name: &str, vars: &Vars) -> Option<String> {
    let value = vars.get(name)?;
    Some(match kind {
        RefKind::Plain => value.to_string(),
        RefKind::Literal => quote_literal(value),
        RefKind::Ident => quote_ident(value),
    })
}

/// Splits the rest of a backslash command's line into argument words the way psql does for
/// ordinary arguments:
/// - words are separated by whitespace;
/// - `'...'` is quoted text: `''` is a quote, and `\n`, `\t`, `\r`, `\\`, `\'` are escapes;
/// - `"..."` keeps its quotes (psql passes them through);
/// - `:name`, `:'name'`, `:"name"` are replaced by the variable (an unknown one stays as is);
/// - anything else is literal, and the pieces of one word are joined.
///
/// Backquotes (shell commands in psql) are not supported and are kept literally.
pub fn meta_args(raw: &str, vars: &Vars) -> Vec<String> {
    let mut words = Vec::new();
    let mut rest = raw;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return words;
        }
        let mut word = String::new();
        while let Some(c) = rest.chars().next() {
            if c.is_whitespace() {
                break;
            }
            match c {
                '\'' => {
                    let (text, used) = single_quoted(rest);
                    word.push_str(&text);
                    rest = &rest[used..];
                }
                '"' => {
                    let used = double_quoted_len(rest);
                    word.push_str(&rest[..used]);
                    rest = &rest[used..];
                }
                ':' => match parse_ref(rest) {
                    Some((kind, name, used)) => {
                        match expand_ref(kind, name, vars) {
                            Some(value) => word.push_str(&value),
                            None => word.push_str(&rest[..used]),
                        }
                        rest = &rest[used..];
                    }
                    None => {
                        word.push(':');
                        rest = &rest[1..];
                    }
                },
                _ => {
                    word.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        words.push(word);
    }
}

/// The text of a `'...'` argument starting at `s[0]`, and how many bytes it used. An
/// unterminated quote runs to the end of the line.
fn single_quoted(s: &str) -> (String, usize) {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1).peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\'' => {
                if let Some(&(_, '\'')) = chars.peek() {
                    chars.next();
                    out.push('\'');
                } else {
                    return (out, i + 1);
                }
            }
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                Some((_, 'r')) => out.push('\r'),
                Some((_, other)) => out.push(other),
                None => out.push('\\'),
            },
            _ => out.push(c),
        }
    }
    (out, s.len())
}

/// Length in bytes of a `"..."` argument starting at `s[0]` (`""` inside is a quote).
fn double_quoted_len(s: &str) -> usize {
    let mut chars = s.char_indices().skip(1).peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if let Some(&(_, '"')) = chars.peek() {
                chars.next();
            } else {
                return i + 1;
            }
        }
    }
    s.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        let mut v = Vars::default();
        v.set("ERRORCODE", "42P01");
        v.set("msg", "it's \"odd\"");
        v.set("empty", "");
        v
    }

    #[test]
    fn references_are_recognised_like_psql() {
        assert_eq!(parse_ref(":foo bar"), Some((RefKind::Plain, "foo", 4)));
        assert_eq!(parse_ref(":'foo' x"), Some((RefKind::Literal, "foo", 6)));
        assert_eq!(parse_ref(":\"foo\""), Some((RefKind::Ident, "foo", 6)));
        assert_eq!(parse_ref("::text"), None);
        assert_eq!(parse_ref(":= 1"), None);
        assert_eq!(
            parse_ref(":1"),
            None,
            "array slices like a[1:2] are not variables"
        );
        assert_eq!(parse_ref(":'foo"), None);
        assert_eq!(parse_ref(":"), None);
    }

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b"), r"'a\b'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn meta_args_substitute_and_unquote() {
        let v = vars();
        assert_eq!(
            meta_args("Error Code - :ERRORCODE", &v),
            ["Error", "Code", "-", "42P01"]
        );
        assert_eq!(meta_args("'a b'  'it''s'", &v), ["a b", "it's"]);
        assert_eq!(meta_args(r"'tab\there'", &v), ["tab\there"]);
        assert_eq!(meta_args("\"d e\"", &v), ["\"d e\""]);
        assert_eq!(meta_args(":'msg'", &v), ["'it''s \"odd\"'"]);
        assert_eq!(meta_args("x:ERRORCODE:nope", &v), ["x42P01:nope"]);
        assert_eq!(meta_args(":empty", &v), [""]);
        assert_eq!(meta_args("   ", &v), Vec::<String>::new());
    }
}

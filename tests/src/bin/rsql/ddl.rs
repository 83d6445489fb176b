//! Redshift-only table attributes, removed from `CREATE TABLE` so that converted scripts run
//! on PostgreSQL. Real Redshift uses them for storage and distribution only: dropping them
//! changes no result a test can see.
//!
//! Removed, in any case, outside quotes and comments:
//! - `ENCODE <encoding>` (a column's compression, or the table's `ENCODE AUTO`);
//! - `DISTKEY`, `DISTKEY(<column>)`, and `DISTSTYLE <EVEN|KEY|ALL|AUTO>`;
//! - `SORTKEY`, `SORTKEY(<columns>)`, `COMPOUND SORTKEY(...)`, `INTERLEAVED SORTKEY(...)`,
//!   and `SORTKEY AUTO`;
//! - `BACKUP NO` / `BACKUP YES`.
//!
//! Any other statement goes to the server unchanged.

use std::borrow::Cow;

/// The statement as PostgreSQL takes it.
pub fn strip_redshift_table_attributes(sql: &str) -> Cow<'_, str> {
    if !is_create_table(sql) {
        return Cow::Borrowed(sql);
    }
    let chars: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut changed = false;
    while i < chars.len() {
        let c = chars[i];
        // Quotes and comments are copied as they are.
        if c == '\'' || c == '"' {
            let end = closing(&chars, i + 1, c);
            out.extend(&chars[i..end]);
            i = end;
            continue;
        }
        if c == '-' && chars.get(i + 1) == Some(&'-') {
            let end = (i..chars.len())
                .find(|&j| chars[j] == '\n')
                .unwrap_or(chars.len());
            out.extend(&chars[i..end]);
            i = end;
            continue;
        }
        let at_word = c.is_ascii_alphabetic() && (i == 0 || !is_ident(chars[i - 1]));
        if at_word {
            if let Some(end) = attribute_end(&chars, i) {
                changed = true;
                i = end;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(sql)
    }
}

fn is_create_table(sql: &str) -> bool {
    let words: Vec<String> = sql
        .split_whitespace()
        .take(5)
        .map(str::to_ascii_uppercase)
        .collect();
    words.first().is_some_and(|w| w == "CREATE") && words.iter().any(|w| w == "TABLE")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$'
}

/// The index after the closing `quote` (doubled quotes are part of the text).
fn closing(chars: &[char], mut i: usize, quote: char) -> usize {
    while i < chars.len() {
        if chars[i] == quote {
            if chars.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    chars.len()
}

/// The word at `i`, upper-cased, and the index after it.
fn word(chars: &[char], i: usize) -> (String, usize) {
    let end = (i..chars.len())
        .find(|&j| !is_ident(chars[j]))
        .unwrap_or(chars.len());
    (
        chars[i..end]
            .iter()
            .collect::<String>()
            .to_ascii_uppercase(),
        end,
    )
}

fn skip_space(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// After an optional `( ... )` at `i` (spaces first allowed).
fn skip_parens(chars: &[char], i: usize) -> usize {
    let j = skip_space(chars, i);
    if chars.get(j) != Some(&'(') {
        return i;
    }
    let mut depth = 0;
    for (k, &c) in chars.iter().enumerate().skip(j) {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return k + 1;
                }
            }
            _ => {}
        }
    }
    chars.len()
}

/// When a Redshift-only attribute starts at `i`: the index after it.
fn attribute_end(chars: &[char], i: usize) -> Option<usize> {
    let (first, after) = word(chars, i);
    let next_word = |from: usize| {
        let j = skip_space(chars, from);
        let (w, end) = word(chars, j);
        (w, end)
    };
    match first.as_str() {
        // A keyword and the word after it.
        "ENCODE" | "DISTSTYLE" | "BACKUP" => {
            let (w, end) = next_word(after);
            (!w.is_empty()).then_some(end)
        }
        "DISTKEY" => Some(skip_parens(chars, after)),
        "SORTKEY" => {
            let (w, end) = next_word(after);
            Some(if w == "AUTO" {
                end
            } else {
                skip_parens(chars, after)
            })
        }
        "COMPOUND" | "INTERLEAVED" => {
            let (w, end) = next_word(after);
            (w == "SORTKEY").then(|| skip_parens(chars, end))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn squash(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn redshift_attributes_go_and_the_rest_stays() {
        let sql = "create table if not exists s.t (\n  id integer encode az64 distkey,\n  \
                   name varchar(64) ENCODE zstd sortkey,\n  note varchar(10) default 'encode x'\n) \
                   backup no diststyle key distkey(id) compound sortkey(id, name)";
        assert_eq!(
            squash(&strip_redshift_table_attributes(sql)),
            "create table if not exists s.t ( id integer , name varchar(64) , note varchar(10) \
             default 'encode x' )"
        );
        let auto = "CREATE TABLE t (a int) DISTSTYLE AUTO SORTKEY AUTO ENCODE AUTO";
        assert_eq!(
            squash(&strip_redshift_table_attributes(auto)),
            "CREATE TABLE t (a int)"
        );
    }

    #[test]
    fn other_statements_are_untouched() {
        for sql in [
            "insert into t values ('encode az64 distkey')",
            "select encode(x, 'hex') from t",
            "create view v as select 1",
        ] {
            assert!(matches!(
                strip_redshift_table_attributes(sql),
                Cow::Borrowed(_)
            ));
        }
    }
}

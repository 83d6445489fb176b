//! The script lexer: cuts input into SQL statements and backslash commands the way psql does.
//!
//! Owns quoting and comment rules and `:variable` interpolation in SQL text. Does not run
//! anything and does not know what a backslash command means.
//!
//! The rules, as in psql:
//! - a `;` ends a statement unless it is inside `'...'` (and `E'...'` with backslash escapes),
//!   `"..."`, a dollar quote (`$$...$$`, `$tag$...$tag$`), a `--` comment, a nested
//!   `/* ... */` comment, or parentheses;
//! - a `\` outside all of those starts a backslash command that runs to the end of its line; a
//!   statement in progress stays pending across it;
//! - `:name`, `:'name'` and `:"name"` outside quotes and comments are replaced by the variable's
//!   value, as a literal or as an identifier; an unknown variable is left as written. The value
//!   is inserted as text and not scanned again, so it cannot end a statement;
//! - whitespace and `--` comments before a statement are dropped; a statement without any SQL
//!   text (only `;`, or only comments) is not sent;
//! - at the end of input a statement without its `;` is still sent.

use crate::vars::{self, Vars};

/// One unit of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An SQL statement, with its terminating `;` when it had one.
    Statement(String),
    /// A backslash command: its name without the backslash, and the raw rest of its line.
    Meta { name: String, args: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Normal,
    /// Inside `'...'`; `escapes` for `E'...'` strings, where a backslash escapes.
    Quote {
        escapes: bool,
    },
    DoubleQuote,
    /// Inside a dollar quote; holds the whole delimiter, e.g. `$fn$`.
    Dollar(String),
    BlockComment {
        depth: u32,
    },
}

/// Hands out the items of a script one at a time, so that variables set by one item are seen
/// when the next is lexed.
#[derive(Debug)]
pub struct Lexer {
    src: Vec<char>,
    pos: usize,
    buf: String,
    /// Whether `buf` holds SQL text, not only comments and whitespace.
    has_sql: bool,
    state: State,
    parens: u32,
}

impl Lexer {
    pub fn new(src: &str) -> Lexer {
        Lexer {
            src: src.chars().collect(),
            pos: 0,
            buf: String::new(),
            has_sql: false,
            state: State::Normal,
            parens: 0,
        }
    }

    fn peek(&self, offset: usize) -> Option<char> {
        self.src.get(self.pos + offset).copied()
    }

    fn starts_with(&self, text: &str) -> bool {
        let mut rest = self.src[self.pos..].iter();
        text.chars().all(|c| rest.next() == Some(&c))
    }

    fn push_sql(&mut self, c: char) {
        self.buf.push(c);
        if !c.is_whitespace() {
            self.has_sql = true;
        }
    }

    fn take_statement(&mut self) -> Option<Item> {
        let statement = std::mem::take(&mut self.buf);
        let has_sql = std::mem::replace(&mut self.has_sql, false);
        self.parens = 0;
        has_sql.then_some(Item::Statement(statement))
    }

    /// The next statement or backslash command, or `None` at the end of input. `vars` supplies
    /// the values for `:name` references met while lexing this item.
    pub fn next_item(&mut self, vars: &Vars) -> Option<Item> {
        while let Some(c) = self.peek(0) {
            match self.state.clone() {
                State::Normal => {
                    if let Some(item) = self.normal(c, vars) {
                        return Some(item);
                    }
                }
                State::Quote { escapes } => {
                    self.pos += 1;
                    self.buf.push(c);
                    if escapes && c == '\\' {
                        if let Some(next) = self.peek(0) {
                            self.buf.push(next);
                            self.pos += 1;
                        }
                    } else if c == '\'' {
                        if self.peek(0) == Some('\'') {
                            self.buf.push('\'');
                            self.pos += 1;
                        } else {
                            self.state = State::Normal;
                        }
                    }
                }
                State::DoubleQuote => {
                    self.pos += 1;
                    self.buf.push(c);
                    if c == '"' {
                        if self.peek(0) == Some('"') {
                            self.buf.push('"');
                            self.pos += 1;
                        } else {
                            self.state = State::Normal;
                        }
                    }
                }
                State::Dollar(delimiter) => {
                    if self.starts_with(&delimiter) {
                        self.buf.push_str(&delimiter);
                        self.pos += delimiter.chars().count();
                        self.state = State::Normal;
                    } else {
                        self.buf.push(c);
                        self.pos += 1;
                    }
                }
                State::BlockComment { depth } => {
                    if self.starts_with("/*") {
                        self.buf.push_str("/*");
                        self.pos += 2;
                        self.state = State::BlockComment { depth: depth + 1 };
                    } else if self.starts_with("*/") {
                        self.buf.push_str("*/");
                        self.pos += 2;
                        self.state = if depth == 1 {
                            State::Normal
                        } else {
                            State::BlockComment { depth: depth - 1 }
                        };
                    } else {
                        self.buf.push(c);
                        self.pos += 1;
                    }
                }
            }
        }
        self.state = State::Normal;
        self.take_statement()
    }

    /// Handles one character outside quotes and comments; returns an item when one is complete.
    fn normal(&mut self, c: char, vars: &Vars) -> Option<Item> {
        match c {
            ';' if self.parens == 0 => {
                self.pos += 1;
                self.buf.push(';');
                // A lone `;` is not a statement.
                return self.take_statement();
            }
            '\\' => return Some(self.meta()),
            '\'' => {
                // E'...' (also e'...') allows backslash escapes; the E must start a word.
                let mut before = self.buf.chars().rev();
                let escapes = matches!(before.next(), Some('E' | 'e'))
                    && !before.next().is_some_and(vars::is_name_char);
                self.state = State::Quote { escapes };
                self.pos += 1;
                self.push_sql(c);
            }
            '"' => {
                self.state = State::DoubleQuote;
                self.pos += 1;
                self.push_sql(c);
            }
            '$' => {
                // Inside an identifier (`a$b`) a dollar sign is an ordinary character.
                let in_word = self.buf.chars().last().is_some_and(vars::is_name_char);
                match self.dollar_delimiter().filter(|_| !in_word) {
                    Some(delimiter) => {
                        self.pos += delimiter.chars().count();
                        self.buf.push_str(&delimiter);
                        self.has_sql = true;
                        self.state = State::Dollar(delimiter);
                    }
                    None => {
                        self.pos += 1;
                        self.push_sql(c);
                    }
                }
            }
            '-' if self.peek(1) == Some('-') => {
                let end = self.src[self.pos..]
                    .iter()
                    .position(|&c| c == '\n')
                    .map_or(self.src.len(), |n| self.pos + n);
                // Comments before any SQL text are dropped, as psql drops them.
                if self.has_sql {
                    self.buf.extend(&self.src[self.pos..end]);
                }
                self.pos = end;
            }
            '/' if self.peek(1) == Some('*') => {
                self.pos += 2;
                self.buf.push_str("/*");
                self.state = State::BlockComment { depth: 1 };
            }
            ':' => {
                if self.peek(1) == Some(':') {
                    // A `::` cast, never a variable.
                    self.pos += 2;
                    self.buf.push_str("::");
                    self.has_sql = true;
                    return None;
                }
                let rest: String = self.src[self.pos..].iter().take(256).collect();
                match vars::parse_ref(&rest) {
                    Some((kind, name, used)) => {
                        let text = vars::expand_ref(kind, name, vars)
                            .unwrap_or_else(|| rest[..used].to_string());
                        self.pos += rest[..used].chars().count();
                        for ch in text.chars() {
                            self.push_sql(ch);
                        }
                    }
                    None => {
                        self.pos += 1;
                        self.push_sql(c);
                    }
                }
            }
            _ => {
                self.pos += 1;
                match c {
                    '(' => self.parens += 1,
                    ')' => self.parens = self.parens.saturating_sub(1),
                    _ => {}
                }
                // Whitespace before a statement is dropped.
                if !(c.is_whitespace() && self.buf.is_empty()) {
                    self.push_sql(c);
                }
            }
        }
        None
    }

    /// A dollar-quote delimiter (`$$` or `$tag$`) at the current position. A tag starts with
    /// a letter or `_`, so `$1` (a parameter) is not one.
    fn dollar_delimiter(&self) -> Option<String> {
        let mut i = 1;
        while let Some(c) = self.peek(i) {
            if c == '$' {
                return Some(self.src[self.pos..=self.pos + i].iter().collect());
            }
            let ok = vars::is_name_char(c) && !(i == 1 && c.is_ascii_digit());
            if !ok {
                return None;
            }
            i += 1;
        }
        None
    }

    /// A backslash command at the current position: the name runs to whitespace (or another
    /// backslash), the arguments to the end of the line. The newline is consumed.
    fn meta(&mut self) -> Item {
        self.pos += 1;
        let start = self.pos;
        while let Some(c) = self.peek(0) {
            if c.is_whitespace() || c == '\\' {
                break;
            }
            self.pos += 1;
        }
        let name: String = self.src[start..self.pos].iter().collect();
        let end = self.src[self.pos..]
            .iter()
            .position(|&c| c == '\n')
            .map_or(self.src.len(), |n| self.pos + n);
        let args: String = self.src[self.pos..end].iter().collect();
        self.pos = (end + 1).min(self.src.len());
        Item::Meta { name, args }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items_with(src: &str, vars: &Vars) -> Vec<Item> {
        let mut lexer = Lexer::new(src);
        std::iter::from_fn(|| lexer.next_item(vars)).collect()
    }

    fn items(src: &str) -> Vec<Item> {
        items_with(src, &Vars::default())
    }

    fn stmt(s: &str) -> Item {
        Item::Statement(s.to_string())
    }

    fn meta(name: &str, args: &str) -> Item {
        Item::Meta {
            name: name.to_string(),
            args: args.to_string(),
        }
    }

    #[test]
    fn semicolons_split_statements() {
        assert_eq!(
            items("select 1; select 2;\n  insert into t values (1);"),
            [
                stmt("select 1;"),
                stmt("select 2;"),
                stmt("insert into t values (1);")
            ]
        );
    }

    #[test]
    fn semicolons_inside_quotes_do_not_split() {
        assert_eq!(
            items("select 'a;b', \"c;d\", 'it''s;'; select 2;"),
            [stmt("select 'a;b', \"c;d\", 'it''s;';"), stmt("select 2;")]
        );
        assert_eq!(
            items(r"select E'\';still', 'back\'; select 2;"),
            [stmt(r"select E'\';still', 'back\';"), stmt("select 2;")],
            "a backslash escapes only in E'' strings"
        );
    }

    #[test]
    fn dollar_quotes_hide_semicolons_and_backslashes() {
        let body = "create function f() returns int as $$ begin return 1; end $$ language plpgsql;";
        assert_eq!(items(body), [stmt(body)]);
        let tagged = "do $fn$ begin perform 1; /* $$ */ end $fn$;";
        assert_eq!(items(tagged), [stmt(tagged)]);
        let backslash = "select $$ \\echo no $$;";
        assert_eq!(items(backslash), [stmt(backslash)]);
        assert_eq!(
            items("select $1; select a$b$; select 2;"),
            [stmt("select $1;"), stmt("select a$b$;"), stmt("select 2;")],
            "parameters and identifiers with $ are not dollar quotes"
        );
    }

    #[test]
    fn comments_hide_semicolons_and_leading_comments_are_dropped() {
        assert_eq!(
            items("-- intro; not sql\nselect 1 -- trailing; note\n;"),
            [stmt("select 1 -- trailing; note\n;")]
        );
        assert_eq!(
            items("select /* a; /* nested; */ still; */ 1;"),
            [stmt("select /* a; /* nested; */ still; */ 1;")]
        );
        assert_eq!(items("-- only a comment\n/* and this */\n;;"), []);
    }

    #[test]
    fn parentheses_hide_semicolons() {
        let rule = "create rule r as on insert to t do also (insert into a values (1); insert into b values (2));";
        assert_eq!(items(rule), [stmt(rule)]);
    }

    #[test]
    fn backslash_commands_end_at_the_line_end() {
        assert_eq!(
            items("select 1;\n\\if :ERROR <> 0\n  \\echo 'bad; really'\n\\endif\nselect 2;"),
            [
                stmt("select 1;"),
                meta("if", " :ERROR <> 0"),
                meta("echo", " 'bad; really'"),
                meta("endif", ""),
                stmt("select 2;"),
            ]
        );
    }

    #[test]
    fn a_pending_statement_survives_a_backslash_command() {
        assert_eq!(
            items("select\n\\echo mid\n1;"),
            [meta("echo", " mid"), stmt("select\n1;")]
        );
    }

    #[test]
    fn backslashes_inside_quotes_and_comments_are_not_commands() {
        assert_eq!(
            items("select '\\q';\n-- \\q\n/* \\q */ select 2;"),
            [stmt("select '\\q';"), stmt("/* \\q */ select 2;")]
        );
    }

    #[test]
    fn the_last_statement_needs_no_semicolon() {
        assert_eq!(
            items("select 1;\nselect 2\n"),
            [stmt("select 1;"), stmt("select 2\n")]
        );
        assert_eq!(items("select 'open"), [stmt("select 'open")]);
    }

    #[test]
    fn variables_are_substituted_outside_quotes_only() {
        let mut v = Vars::default();
        v.set("tbl", "rsql_blog.blog_table");
        v.set("name", "O'Brien");
        v.set("semi", "1; drop table x");
        assert_eq!(
            items_with(
                "select * from :tbl where n = :'name' and c = :\"name\" and t = ':tbl' and x::text = :nope; -- :tbl\n",
                &v
            ),
            [stmt(
                "select * from rsql_blog.blog_table where n = 'O''Brien' and c = \"O'Brien\" and t = ':tbl' and x::text = :nope;"
            )]
        );
        assert_eq!(
            items_with("select $$:tbl$$, /* :tbl */ :semi;", &v),
            [stmt("select $$:tbl$$, /* :tbl */ 1; drop table x;")],
            "a value is not scanned again, so its ; does not split"
        );
    }

    #[test]
    fn variables_are_read_when_their_item_is_lexed() {
        let mut lexer = Lexer::new("\\set x 1\nselect :x;");
        let mut v = Vars::default();
        assert_eq!(lexer.next_item(&v), Some(meta("set", " x 1")));
        v.set("x", "42");
        assert_eq!(lexer.next_item(&v), Some(stmt("select 42;")));
        assert_eq!(lexer.next_item(&v), None);
    }
}

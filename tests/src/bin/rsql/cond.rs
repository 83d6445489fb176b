//! The expression language of `\if` and `\elseif`.
//!
//! Owns parsing and evaluating one expression. Does not own the `\if` stack (see `run`).
//!
//! RSQL documents comparisons such as `\if :ACTIVITYCOUNT = 0` and `\if :ERROR <> 0` but not a
//! grammar, so this is the subset converted BTEQ scripts use:
//!
//! ```text
//! expr    := and ( OR and )*
//! and     := not ( AND not )*
//! not     := NOT not | compare
//! compare := operand ( op operand )?        op: = == <> != < > <= >=
//! operand := ( expr ) | word | 'quoted' | "quoted" | :var | :'var' | :"var"
//! ```
//!
//! - `AND`, `OR`, `NOT` are keywords in any case.
//! - A comparison is numeric when both operands are unquoted numbers (`00000 = 0` holds), and
//!   an exact string comparison otherwise. A quoted operand is always a string.
//! - `:var` is replaced by the variable's value as one operand; the value is not parsed again,
//!   so a message with spaces or operators in it stays one operand. An unknown variable stays
//!   as the text `:var`, as in psql.
//! - An operand standing alone is a truth value: psql's `true/false/yes/no/on/off` (or an
//!   unambiguous prefix, any case), or a number, true when it is not zero.

use crate::vars::{self, RefKind, Vars};

/// Why an expression could not be evaluated. psql treats such an `\if` as false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CondError(pub String);

impl std::fmt::Display for CondError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Open,
    Close,
    And,
    Or,
    Not,
    Op(Op),
    Word { text: String, quoted: bool },
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Bool(bool),
    Word { text: String, quoted: bool },
}

/// Evaluates the text after `\if` / `\elseif`.
pub fn evaluate(expr: &str, vars: &Vars) -> Result<bool, CondError> {
    let tokens = tokenize(expr, vars)?;
    if tokens.is_empty() {
        return Err(CondError("missing expression".to_string()));
    }
    let mut parser = Parser { tokens, pos: 0 };
    let value = parser.or()?;
    if let Some(extra) = parser.tokens.get(parser.pos) {
        return Err(CondError(format!("unexpected {}", describe(extra))));
    }
    truth(value)
}

fn describe(token: &Token) -> String {
    match token {
        Token::Open => "\"(\"".to_string(),
        Token::Close => "\")\"".to_string(),
        Token::And => "AND".to_string(),
        Token::Or => "OR".to_string(),
        Token::Not => "NOT".to_string(),
        Token::Op(op) => format!("operator {op:?}"),
        Token::Word { text, .. } => format!("\"{text}\""),
    }
}

fn tokenize(expr: &str, vars: &Vars) -> Result<Vec<Token>, CondError> {
    let mut tokens = Vec::new();
    let mut rest = expr;
    while let Some(c) = rest.chars().next() {
        if c.is_whitespace() {
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let two = rest.get(..2).unwrap_or("");
        let (token, used) = match (c, two) {
            ('(', _) => (Token::Open, 1),
            (')', _) => (Token::Close, 1),
            (_, "<>") | (_, "!=") => (Token::Op(Op::Ne), 2),
            (_, "<=") => (Token::Op(Op::Le), 2),
            (_, ">=") => (Token::Op(Op::Ge), 2),
            (_, "==") => (Token::Op(Op::Eq), 2),
            ('=', _) => (Token::Op(Op::Eq), 1),
            ('<', _) => (Token::Op(Op::Lt), 1),
            ('>', _) => (Token::Op(Op::Gt), 1),
            ('\'' | '"', _) => {
                let (text, used) = quoted(rest, c)?;
                (Token::Word { text, quoted: true }, used)
            }
            (':', _) => match vars::parse_ref(rest) {
                Some((kind, name, used)) => {
                    let token = match vars.get(name) {
                        Some(value) => Token::Word {
                            text: value.to_string(),
                            quoted: kind != RefKind::Plain,
                        },
                        None => Token::Word {
                            text: rest[..used].to_string(),
                            quoted: false,
                        },
                    };
                    (token, used)
                }
                None => bare(rest),
            },
            _ => bare(rest),
        };
        tokens.push(token);
        rest = &rest[used..];
    }
    Ok(tokens)
}

/// A quoted operand starting at `s[0]` (`quote` doubled inside stands for itself).
fn quoted(s: &str, quote: char) -> Result<(String, usize), CondError> {
    let mut text = String::new();
    let mut chars = s.char_indices().skip(1).peekable();
    while let Some((i, c)) = chars.next() {
        if c == quote {
            if chars.peek().is_some_and(|&(_, next)| next == quote) {
                chars.next();
            } else {
                return Ok((text, i + 1));
            }
        }
        text.push(c);
    }
    Err(CondError(format!("unterminated quoted string: {s}")))
}

/// A bare word: everything up to whitespace, a parenthesis, an operator character or a quote.
fn bare(s: &str) -> (Token, usize) {
    let end = s
        .char_indices()
        .skip(1)
        .find(|&(_, c)| c.is_whitespace() || "()=<>!'\"".contains(c))
        .map_or(s.len(), |(i, _)| i);
    let text = &s[..end];
    let token = match text.to_ascii_uppercase().as_str() {
        "AND" => Token::And,
        "OR" => Token::Or,
        "NOT" => Token::Not,
        _ => Token::Word {
            text: text.to_string(),
            quoted: false,
        },
    };
    (token, end)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        token
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn or(&mut self) -> Result<Value, CondError> {
        let mut value = self.and()?;
        while self.peek() == Some(&Token::Or) {
            self.pos += 1;
            let right = self.and()?;
            value = Value::Bool(truth(value)? | truth(right)?);
        }
        Ok(value)
    }

    fn and(&mut self) -> Result<Value, CondError> {
        let mut value = self.not()?;
        while self.peek() == Some(&Token::And) {
            self.pos += 1;
            let right = self.not()?;
            value = Value::Bool(truth(value)? & truth(right)?);
        }
        Ok(value)
    }

    fn not(&mut self) -> Result<Value, CondError> {
        if self.peek() == Some(&Token::Not) {
            self.pos += 1;
            return Ok(Value::Bool(!truth(self.not()?)?));
        }
        self.compare()
    }

    fn compare(&mut self) -> Result<Value, CondError> {
        let left = self.operand()?;
        let Some(Token::Op(op)) = self.peek().cloned() else {
            return Ok(left);
        };
        self.pos += 1;
        let right = self.operand()?;
        match (left, right) {
            (
                Value::Word {
                    text: a,
                    quoted: qa,
                },
                Value::Word {
                    text: b,
                    quoted: qb,
                },
            ) => Ok(Value::Bool(compare(&a, qa, op, &b, qb))),
            _ => Err(CondError(
                "a comparison needs a value on each side, not a condition".to_string(),
            )),
        }
    }

    fn operand(&mut self) -> Result<Value, CondError> {
        match self.next() {
            Some(Token::Open) => {
                let value = self.or()?;
                match self.next() {
                    Some(Token::Close) => Ok(value),
                    _ => Err(CondError("missing \")\"".to_string())),
                }
            }
            Some(Token::Word { text, quoted }) => Ok(Value::Word { text, quoted }),
            Some(other) => Err(CondError(format!("unexpected {}", describe(&other)))),
            None => Err(CondError("expression ends too early".to_string())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
enum Number {
    Int(i128),
    Float(f64),
}

/// An unquoted number: an integer, or a decimal with an optional exponent. Words such as
/// `inf` or `NaN` are strings here even though Rust would parse them.
fn number(text: &str) -> Option<Number> {
    if let Ok(i) = text.parse::<i128>() {
        return Some(Number::Int(i));
    }
    let numeric_chars = text
        .chars()
        .all(|c| c.is_ascii_digit() || "+-.eE".contains(c));
    let has_digit = text.chars().any(|c| c.is_ascii_digit());
    if numeric_chars && has_digit {
        text.parse::<f64>().ok().map(Number::Float)
    } else {
        None
    }
}

fn compare(a: &str, a_quoted: bool, op: Op, b: &str, b_quoted: bool) -> bool {
    use std::cmp::Ordering;
    let numbers = (!a_quoted && !b_quoted)
        .then(|| number(a).zip(number(b)))
        .flatten();
    let ordering = match numbers {
        Some((Number::Int(x), Number::Int(y))) => Some(x.cmp(&y)),
        Some((x, y)) => {
            let as_f64 = |n| match n {
                Number::Int(i) => i as f64,
                Number::Float(f) => f,
            };
            as_f64(x).partial_cmp(&as_f64(y))
        }
        None => Some(a.cmp(b)),
    };
    let Some(ordering) = ordering else {
        return op == Op::Ne;
    };
    match op {
        Op::Eq => ordering == Ordering::Equal,
        Op::Ne => ordering != Ordering::Equal,
        Op::Lt => ordering == Ordering::Less,
        Op::Gt => ordering == Ordering::Greater,
        Op::Le => ordering != Ordering::Greater,
        Op::Ge => ordering != Ordering::Less,
    }
}

/// The truth of a value standing alone (psql's `ParseVariableBool`, plus numbers).
fn truth(value: Value) -> Result<bool, CondError> {
    let text = match value {
        Value::Bool(b) => return Ok(b),
        Value::Word { text, .. } => text,
    };
    let lower = text.trim().to_ascii_lowercase();
    if let Some(n) = number(&lower) {
        return Ok(match n {
            Number::Int(i) => i != 0,
            Number::Float(f) => f != 0.0,
        });
    }
    // Prefixes as psql accepts them; "o" alone is ambiguous between on and off.
    let is_prefix = |word: &str| !lower.is_empty() && word.starts_with(&lower);
    if is_prefix("true") || is_prefix("yes") || (lower.len() >= 2 && is_prefix("on")) {
        Ok(true)
    } else if is_prefix("false") || is_prefix("no") || (lower.len() >= 2 && is_prefix("off")) {
        Ok(false)
    } else {
        Err(CondError(format!(
            "unrecognized value \"{text}\": Boolean expected"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        let mut v = Vars::default();
        v.set("ERROR", "0");
        v.set("ERRORCODE", "00000");
        v.set("ACTIVITYCOUNT", "3");
        v.set("LAST_ERROR_MESSAGE", "relation \"x\" does not exist");
        v.set("FLAG", "on");
        v
    }

    fn eval(expr: &str) -> Result<bool, CondError> {
        evaluate(expr, &vars())
    }

    #[test]
    fn comparisons_from_converted_scripts() {
        assert_eq!(eval(":ERROR <> 0"), Ok(false));
        assert_eq!(eval(":ERROR = 0"), Ok(true));
        assert_eq!(eval(":ACTIVITYCOUNT = 0"), Ok(false));
        assert_eq!(eval(":ACTIVITYCOUNT > 2"), Ok(true));
        assert_eq!(eval(":ACTIVITYCOUNT >= 3"), Ok(true));
        assert_eq!(eval(":ACTIVITYCOUNT < 3"), Ok(false));
        assert_eq!(eval(":ACTIVITYCOUNT <= 3"), Ok(true));
        assert_eq!(eval(":ACTIVITYCOUNT != 3"), Ok(false));
        assert_eq!(eval(":ACTIVITYCOUNT == 3"), Ok(true));
    }

    #[test]
    fn numbers_compare_numerically_and_quoted_text_as_strings() {
        assert_eq!(eval(":ERRORCODE = 0"), Ok(true), "00000 is the number 0");
        assert_eq!(eval(":'ERRORCODE' = '00000'"), Ok(true));
        assert_eq!(eval(":'ERRORCODE' = '0'"), Ok(false), "quoted means string");
        assert_eq!(eval("10 > 9"), Ok(true));
        assert_eq!(eval("'10' > '9'"), Ok(false));
        assert_eq!(eval("2.5 < 10"), Ok(true));
        assert_eq!(eval("1e3 = 1000"), Ok(true));
        assert_eq!(eval("42P01 <> 0"), Ok(true));
        assert_eq!(eval("abc = ABC"), Ok(false));
    }

    #[test]
    fn a_variable_is_one_operand_however_it_reads() {
        assert_eq!(
            eval(":LAST_ERROR_MESSAGE = 'relation \"x\" does not exist'"),
            Ok(true)
        );
        assert_eq!(eval(":'LAST_ERROR_MESSAGE' <> ''"), Ok(true));
        assert_eq!(
            eval(":UNKNOWN = ':UNKNOWN'"),
            Ok(true),
            "unknown stays as text"
        );
    }

    #[test]
    fn logic_and_precedence() {
        assert_eq!(eval(":ERROR = 0 AND :ACTIVITYCOUNT = 3"), Ok(true));
        assert_eq!(eval(":ERROR <> 0 or :ACTIVITYCOUNT = 3"), Ok(true));
        assert_eq!(eval("NOT :ERROR = 0"), Ok(false), "NOT binds looser than =");
        assert_eq!(eval("true OR false AND false"), Ok(true), "AND before OR");
        assert_eq!(eval("(true OR false) AND false"), Ok(false));
        assert_eq!(eval("not not (1 = 1)"), Ok(true));
    }

    #[test]
    fn plain_truth_values() {
        for (expr, want) in [
            ("true", true),
            ("false", false),
            ("1", true),
            ("0", false),
            ("t", true),
            ("OFF", false),
            (":FLAG", true),
            ("yes", true),
            ("no", false),
            ("7", true),
        ] {
            assert_eq!(eval(expr), Ok(want), "{expr}");
        }
    }

    #[test]
    fn malformed_expressions_are_errors() {
        for expr in [
            "",
            "maybe",
            "o",
            ":ERROR <>",
            "(1 = 1",
            "1 = 1)",
            "'open",
            "(1 = 1) = true",
            "AND 1",
        ] {
            assert!(eval(expr).is_err(), "{expr:?} should not evaluate");
        }
    }
}

//! Masking of secret values in every text the agent or the job owner sends out.
//!
//! The one masking function, [`mask`]: every value the agent knows to be
//! secret is [`remember`]ed (the configured password, and each field of a resolved secret:
//! `password`, `username`, `host`, `dbname`), and every exit point that can carry text a job
//! printed (the failure cause, the success output, the audit and local audit, the lock state,
//! the agent's own log) passes it through [`mask`], which writes each such value as `***`.
//! Values of at most [`MIN_MASKED_CHARS`] - 1 characters and all-digit values (a port) are
//! not remembered: masking `5439` or `db` would blank ordinary text everywhere. A job's raw log
//! (the file and its CloudWatch stream) is the script's own output and is never rewritten.
//!
//! Must not touch: where secrets come from (the agent's `secrets`).

use std::borrow::Cow;
use std::sync::RwLock;

/// The shortest value [`remember`] keeps: shorter ones are too likely to be ordinary text.
pub const MIN_MASKED_CHARS: usize = 4;
/// What a secret value is replaced with.
pub const MASK: &str = "***";

/// Secret values known to this process, longest first (so a value containing another is
/// masked whole); both as written and as JSON escapes them.
static KNOWN: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Remembers `value` as secret for [`mask`], unless it is too short or all digits.
pub fn remember(value: &str) {
    if value.chars().count() < MIN_MASKED_CHARS || value.chars().all(|c| c.is_ascii_digit()) {
        return;
    }
    let escaped = serde_json::to_string(value).unwrap_or_default();
    let escaped = escaped
        .strip_prefix('"')
        .and_then(|e| e.strip_suffix('"'))
        .unwrap_or(value)
        .to_string();
    let Ok(mut known) = KNOWN.write() else { return };
    for form in [value.to_string(), escaped] {
        if !known.contains(&form) {
            known.push(form);
        }
    }
    known.sort_by_key(|k| std::cmp::Reverse(k.len()));
}

/// Remembers the secret values of a job environment: `RSPASSWORD`.
pub fn remember_env(env: &[(String, String)]) {
    for (name, value) in env {
        if name == "RSPASSWORD" {
            remember(value);
        }
    }
}

/// `text` with every remembered secret value replaced by [`MASK`].
pub fn mask(text: &str) -> Cow<'_, str> {
    let Ok(known) = KNOWN.read() else {
        return Cow::Borrowed(text);
    };
    let mut out = Cow::Borrowed(text);
    for secret in known.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), MASK));
        }
    }
    out
}

/// [`mask`] on every string inside a JSON value, in place.
pub fn mask_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) => {
            if let Cow::Owned(masked) = mask(s) {
                *s = masked;
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(mask_json),
        serde_json::Value::Object(map) => map.values_mut().for_each(mask_json),
        _ => {}
    }
}

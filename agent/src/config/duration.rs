//! The values every table reads the same way: durations (`"30s"`, `"1h 30m"`), memory sizes
//! (`"512M"`), and positive whole numbers, each turned into a [`KeyError`] that names its
//! key when it does not parse.

use std::time::Duration;

use super::KeyError;

/// `value` read as a duration, or `default` when the key is absent.
pub(super) fn duration_or(
    key: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, KeyError> {
    match value {
        None => Ok(default),
        Some(text) => parse_duration(&text).map_err(|reason| (key, reason)),
    }
}

/// `value` as a positive whole number, or `default` when the key is absent.
pub(super) fn positive_or(
    key: &'static str,
    value: Option<i64>,
    default: u64,
) -> Result<u64, KeyError> {
    match value {
        None => Ok(default),
        Some(n) if n > 0 => Ok(n as u64),
        Some(n) => Err((key, format!("must be a positive whole number, got {n}"))),
    }
}

pub use crate::job::MIN_MEMORY_MAX;

/// Parses a memory size as systemd writes one: bytes, or a whole number with `K`, `M`, `G`
/// or `T` (powers of 1024), at least [`MIN_MEMORY_MAX`].
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (digits, unit) = match trimmed.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => trimmed.split_at(at),
        None => (trimmed, ""),
    };
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?} is not a size like \"512M\" or \"4G\"")),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("{text:?} is not a size like \"512M\" or \"4G\""))?;
    if bytes < MIN_MEMORY_MAX {
        return Err(format!("{text:?} is less than 16M"));
    }
    Ok(bytes)
}

/// Parses human-readable durations such as `30s`, `6h` or `1h 30m`.
///
/// Durations are read as strings and parsed here rather than through `humantime-serde`: the
/// parsing is the same `humantime`, but here a bad value becomes [`super::ConfigError::Invalid`]
/// naming the key (`jobs.kill_grace: "5 parsecs" is not a duration like "30s" ...`), where a
/// serde error would only point at a line and column of the TOML.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like \"30s\" or \"6h\": {e}"))
}

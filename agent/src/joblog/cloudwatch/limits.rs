//! The `PutLogEvents` limits, and cutting a message to fit one event.

/// What CloudWatch counts on top of each message's UTF-8 bytes, per event.
pub const EVENT_OVERHEAD: usize = 26;
/// The largest event CloudWatch takes, overhead included.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;
/// The longest message of one event.
pub const MAX_MESSAGE_BYTES: usize = MAX_EVENT_BYTES - EVENT_OVERHEAD;
/// The largest `PutLogEvents` batch, counting [`EVENT_OVERHEAD`] per event.
pub const MAX_BATCH_BYTES: usize = 1_048_576;
/// The most events in one `PutLogEvents` batch.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// The events of one batch must lie within less than this many milliseconds.
pub const MAX_BATCH_SPAN_MS: i64 = 24 * 3600 * 1000;

/// Cuts `text` into pieces of at most `max` bytes, on character boundaries, in order. An
/// empty text gives no pieces.
pub fn split_message(text: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = piece_end(rest, max);
        let (piece, tail) = rest.split_at(end);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// The length of the next piece of `rest`: at most `max` bytes, on a char boundary, and never
/// zero (a `max` below one character's width still makes progress).
pub(super) fn piece_end(rest: &str, max: usize) -> usize {
    if rest.len() <= max {
        return rest.len();
    }
    let mut end = max;
    while end > 0 && !rest.is_char_boundary(end) {
        end -= 1;
    }
    if end == 0 {
        end = rest.chars().next().map_or(rest.len(), char::len_utf8);
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_message_cuts_on_char_boundaries() {
        assert!(split_message("", 5).is_empty());
        assert_eq!(split_message("abcdef", 4), vec!["abcd", "ef"]);
        // 'é' is two bytes: a cut at 3 falls inside the second one.
        assert_eq!(split_message("ééé", 3), vec!["é", "é", "é"]);
        assert_eq!(split_message("€", 1), vec!["€"]);
        let text = "aé€😀".repeat(100_000);
        let pieces = split_message(&text, MAX_MESSAGE_BYTES);
        assert!(pieces.iter().all(|p| p.len() <= MAX_MESSAGE_BYTES));
        assert_eq!(pieces.concat(), text);
    }
}

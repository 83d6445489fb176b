//! Records cut into events, and the batch they fill within the `PutLogEvents` limits.

use super::limits::{
    piece_end, EVENT_OVERHEAD, MAX_BATCH_BYTES, MAX_BATCH_EVENTS, MAX_BATCH_SPAN_MS,
    MAX_MESSAGE_BYTES,
};
use super::state::Position;
use crate::joblog::{display, Record};

/// One event, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub timestamp_ms: i64,
    pub message: String,
}

/// A batch being filled; always within the `PutLogEvents` limits.
#[derive(Debug, Default)]
pub struct Batch {
    events: Vec<Event>,
    /// Message bytes plus [`EVENT_OVERHEAD`] per event.
    bytes: usize,
    /// Where shipping stands once this batch is acknowledged.
    end: Position,
}

impl Batch {
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Bytes as CloudWatch counts them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn end(&self) -> Position {
        self.end
    }

    /// Whether one more event with this message length and timestamp stays within the
    /// limits. Any single event fits an empty batch: messages are already cut to size.
    pub(super) fn fits(&self, message_len: usize, timestamp_ms: i64) -> bool {
        let Some(first) = self.events.first() else {
            return true;
        };
        self.events.len() < MAX_BATCH_EVENTS
            && self.bytes + message_len + EVENT_OVERHEAD <= MAX_BATCH_BYTES
            && timestamp_ms - first.timestamp_ms < MAX_BATCH_SPAN_MS
    }

    pub(super) fn push(&mut self, event: Event, end: Position) {
        self.bytes += event.message.len() + EVENT_OVERHEAD;
        self.events.push(event);
        self.end = end;
    }

    pub(super) fn clear(&mut self) {
        self.events.clear();
        self.bytes = 0;
    }
}

/// A record being cut into events.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) timestamp_ms: i64,
    text: String,
    /// Byte index in `text` of the next piece.
    cursor: usize,
    /// Index of the next piece among the record's events.
    index: u32,
    /// The record's first byte and the byte just past it in the file.
    start: u64,
    end: u64,
}

impl Pending {
    pub(super) fn new(record: &Record, start: u64, end: u64, timestamp_ms: i64) -> Pending {
        let mut text = display(&record.payload);
        if text.is_empty() {
            // CloudWatch refuses empty messages; a blank line still counts as a line.
            text.push(' ');
        }
        Pending {
            timestamp_ms,
            text,
            cursor: 0,
            index: 0,
            start,
            end,
        }
    }

    pub(super) fn next_len(&self) -> Option<usize> {
        let rest = &self.text[self.cursor..];
        (!rest.is_empty()).then(|| piece_end(rest, MAX_MESSAGE_BYTES))
    }

    /// Takes the next piece as an event, with the position once it is acknowledged.
    pub(super) fn take(&mut self, len: usize) -> (Event, Position) {
        let message = self.text[self.cursor..self.cursor + len].to_string();
        self.cursor += len;
        self.index += 1;
        let after = if self.cursor >= self.text.len() {
            Position {
                offset: self.end,
                skip: 0,
            }
        } else {
            Position {
                offset: self.start,
                skip: self.index,
            }
        };
        (
            Event {
                timestamp_ms: self.timestamp_ms,
                message,
            },
            after,
        )
    }
}

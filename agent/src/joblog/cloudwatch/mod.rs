//! The CloudWatch Logs shipper: tails one job attempt's local log file from a byte offset and
//! sends its records, as events, to one log stream of `[logs.cloudwatch] log_group`.
//!
//! Owns: the stream's name ([`stream_name`]), creating the stream (and the group when
//! `create_group = true`), turning records into events, cutting batches within the
//! `PutLogEvents` limits, when a batch is sent, retrying it under the one
//! [`RetryPolicy`](crate::aws::retry::RetryPolicy), and the shipping state in
//! `<state_dir>/shipper/` (where each shipment stands, so a restart resumes it).
//!
//! Must not touch: the log file itself (it only reads it, so a slow or absent CloudWatch can
//! never hold up the child or the writer), the job, or its outcome. The daemon decides when a
//! shipment starts and how long the final flush may take.
//!
//! # Records → events
//!
//! Each record (see the [record format](super)) becomes one event: the message is
//! [`display`](crate::joblog::display) of the payload (valid UTF-8; invalid bytes as `\xNN`)
//! without the newline, the timestamp is the record's. A message longer than
//! [`MAX_MESSAGE_BYTES`] (a 256 KiB payload can grow under escaping) becomes consecutive
//! events, cut on character boundaries. A fragment record (`out+`/`err+`, a line longer than 256 KiB or a last line without a
//! newline) is an event like any other: CloudWatch shows a long line as consecutive events,
//! and nothing marks where it ends. An empty line is sent as a single space, because
//! CloudWatch refuses empty messages. stdout and stderr go to the same stream, in file order.
//!
//! # Where shipping stands
//!
//! `<state_dir>/shipper/<sha256(log file)[..16]>.json` holds the log file, group, stream and
//! the [`Position`] acknowledged so far: every record before `offset`, plus the first `skip`
//! events of the record at `offset` (a record whose events spread over two batches). It is
//! written (temp file, fsync, rename, fsync of the directory) after every acknowledged batch, and removed once the
//! job has ended and everything up to the end of the file is acknowledged. The directory is
//! the index of unfinished shipments: [`Shipper::resume_all`] restarts each one at daemon
//! start. A batch acknowledged by CloudWatch but not yet recorded when the agent is killed is
//! sent again after the restart (CloudWatch has no idempotency key); every other line is
//! sent exactly once.
//!
//! # Where each part lives
//!
//! | file | owns |
//! |---|---|
//! | `limits.rs` | the `PutLogEvents` limits and cutting a message to size |
//! | `stream.rs` | the log stream's name |
//! | `batch.rs` | records cut into events, and the batch they fill |
//! | `tail.rs` | reading the job log from a [`Position`] into batches |
//! | `state.rs` | where a shipment stands, on disk |
//! | `shipper.rs` | the [`Shipper`]: starting, resuming and tracking shipments |
//! | `shipment.rs` | one [`Shipment`]'s life: stream, send, retry, record |

mod batch;
mod limits;
mod shipment;
mod shipper;
mod state;
mod stream;
mod tail;

use std::io;
use std::path::PathBuf;

use super::JobLogError;

pub use batch::{Batch, Event};
pub use limits::{
    split_message, EVENT_OVERHEAD, MAX_BATCH_BYTES, MAX_BATCH_EVENTS, MAX_BATCH_SPAN_MS,
    MAX_EVENT_BYTES, MAX_MESSAGE_BYTES,
};
pub use shipment::Shipment;
pub use shipper::Shipper;
pub use state::Position;
pub use stream::stream_name;
pub use tail::{Filled, Tail};

#[derive(Debug, thiserror::Error)]
pub enum ShipperError {
    #[error("cannot create the shipper state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the shipping state {path}")]
    SaveState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the shipping state {path}")]
    ReadState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the shipping state {path} is not valid")]
    BadState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Log(#[from] JobLogError),
}

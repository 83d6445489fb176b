//! Where a shipment stands: `<state_dir>/shipper/<id>.json`, written durably after every
//! acknowledged batch.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ShipperError;

/// How far shipping has got: every record before `offset` is acknowledged, and so are the
/// first `skip` events of the record that starts at `offset`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub offset: u64,
    #[serde(default)]
    pub skip: u32,
}

/// What `<state_dir>/shipper/<id>.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ShipState {
    pub(super) log_file: PathBuf,
    pub(super) log_group: String,
    pub(super) log_stream: String,
    #[serde(flatten)]
    pub(super) position: Position,
    /// The batch being sent, recorded before the send: if the process dies before the new
    /// position is saved, the next start asks CloudWatch whether that batch arrived instead
    /// of sending it twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) in_flight: Option<InFlight>,
}

/// What identifies a batch sent but not yet recorded as acknowledged: where shipping stands
/// after it, and its last event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct InFlight {
    pub(super) end: Position,
    pub(super) last_timestamp_ms: i64,
    pub(super) last_message: String,
}

pub(super) fn save_state(path: &Path, state: &ShipState) -> Result<(), ShipperError> {
    let err = |source| ShipperError::SaveState {
        path: path.to_path_buf(),
        source,
    };
    let text = serde_json::to_vec(state)
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    // A host crash leaves the old state or the new, never a torn one.
    crate::fsutil::write_atomic(path, &text, 0o640).map_err(err)
}

pub(super) fn load_state(path: &Path) -> Result<ShipState, ShipperError> {
    let text = fs::read(path).map_err(|source| ShipperError::ReadState {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| ShipperError::BadState {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.json");
        let state = ShipState {
            log_file: "/var/log/x.log".into(),
            log_group: "/ops/rsql-logs/".into(),
            log_stream: "w/j/20261125T194219Z/a1".into(),
            position: Position {
                offset: 42,
                skip: 3,
            },
            in_flight: Some(InFlight {
                end: Position {
                    offset: 4096,
                    skip: 0,
                },
                last_timestamp_ms: 1_764_460_000_123,
                last_message: "line 7".into(),
            }),
        };
        save_state(&path, &state).expect("save");
        assert_eq!(load_state(&path).expect("load"), state);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s.json")]);
    }
}

//! The name of one job attempt's log stream.

use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::joblog::compact_utc;

/// Longest stream name components; the whole name stays under CloudWatch's 512 characters.
const MAX_STREAM_COMPONENT: usize = 200;
const MAX_ATTEMPT_COMPONENT: usize = 64;

/// The log stream of one job attempt:
/// `<workflow_execution_id>/<job_name>/<UTC start YYYYMMDDTHHMMSSZ>/<attempt_id>`.
///
/// In each component `:`, `*` (CloudWatch refuses them), `/` (so the components stay
/// apart) and control characters become `_`; an empty one becomes `_`; a component over 200
/// bytes (64 for the attempt) is cut and ends in `-` and 8 hex digits of its SHA-256, so
/// distinct names stay distinct. A person finds a job's streams by the prefix
/// `<workflow_execution_id>/<job_name>/`.
pub fn stream_name(
    workflow_execution_id: &str,
    job_name: &str,
    started_at: SystemTime,
    attempt_id: &str,
) -> String {
    format!(
        "{}/{}/{}/{}",
        stream_component(workflow_execution_id, MAX_STREAM_COMPONENT),
        stream_component(job_name, MAX_STREAM_COMPONENT),
        compact_utc(started_at),
        stream_component(attempt_id, MAX_ATTEMPT_COMPONENT),
    )
}

fn stream_component(raw: &str, max: usize) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c == ':' || c == '*' || c == '/' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    if out.len() > max {
        let digest = hex::encode(Sha256::digest(raw.as_bytes()));
        let mut cut = max - 9;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('-');
        out.push_str(&digest[..8]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stream_names_are_findable_and_valid() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_635_739_123);
        assert_eq!(
            stream_name("demo_test_26", "rsql_blog_script_1.sh", at, "abcd12341"),
            "demo_test_26/rsql_blog_script_1.sh/20261125T194219Z/abcd12341"
        );
        let odd = stream_name("a:b*c", "etl/x.sh", at, "");
        assert_eq!(odd, "a_b_c/etl_x.sh/20261125T194219Z/_");
        let long_a = stream_name(&"é".repeat(300), &"j".repeat(600), at, &"9".repeat(99));
        let long_b = stream_name(&format!("{}x", "é".repeat(300)), "j", at, "1");
        assert!(long_a.len() <= 512, "{}", long_a.len());
        assert!(!long_a.contains(':') && !long_a.contains('*'));
        assert_eq!(long_a.split('/').count(), 4);
        assert_ne!(long_a.split('/').next(), long_b.split('/').next());
    }
}

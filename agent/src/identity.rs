//! Who this agent is: the EC2 instance id, for outputs, audit items and lock state.
//!
//! Owns: the lookup order (config override, then IMDSv2, then the host name). The metadata
//! read is cheap where there is no service (see `imds`), so start-up on a laptop or in CI
//! never waits seconds.
//!
//! Must not touch: AWS credentials (the SDK's chain does its own IMDS use) or anything else.

use crate::imds::Imds;

/// Where the instance id came from, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    Imds,
    Hostname,
}

/// Resolves the instance id: `[agent] instance_id`, else IMDSv2 (skipped when
/// `AWS_EC2_METADATA_DISABLED=true`, as the SDK does), else the host name.
pub async fn instance_id(configured: Option<&str>) -> (String, Source) {
    if let Some(id) = configured.filter(|s| !s.is_empty()) {
        return (id.to_string(), Source::Config);
    }
    if let Some(imds) = Imds::from_env() {
        if let Ok(Some(id)) = imds.get("/latest/meta-data/instance-id").await {
            if id.starts_with("i-") && id.len() < 64 && !id.contains(char::is_whitespace) {
                return (id, Source::Imds);
            }
        }
    }
    (hostname(), Source::Hostname)
}

/// The host name, or `localhost` when even that is unavailable.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn config_override_wins() {
        let (id, source) = instance_id(Some("i-override")).await;
        assert_eq!(id, "i-override");
        assert_eq!(source, Source::Config);
    }
}

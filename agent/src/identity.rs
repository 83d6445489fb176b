//! Who this agent is: the EC2 instance id, for outputs, audit items and lock state.
//!
//! Owns: the lookup order (config override, then IMDSv2, then the host name) and keeping
//! the IMDS lookup cheap where there is no IMDS: one short connect attempt, no retries, so
//! start-up on a laptop or in CI never waits seconds.
//!
//! Must not touch: AWS credentials (the SDK's chain does its own IMDS use) or anything else.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IMDS_ADDR: &str = "169.254.169.254:80";
/// IMDS answers in well under a millisecond on EC2; anything slower means there is none.
const IMDS_TIMEOUT: Duration = Duration::from_millis(500);

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
    let disabled = std::env::var("AWS_EC2_METADATA_DISABLED")
        .map(|v| v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    if !disabled {
        if let Ok(Ok(Some(id))) = tokio::time::timeout(IMDS_TIMEOUT * 2, imds_instance_id()).await {
            return (id, Source::Imds);
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

async fn imds_request(request: String) -> std::io::Result<Option<String>> {
    let mut stream = tokio::time::timeout(IMDS_TIMEOUT, TcpStream::connect(IMDS_ADDR))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "IMDS connect"))??;
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(IMDS_TIMEOUT, stream.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "IMDS read"))??;
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Ok(None);
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Ok(None);
    }
    Ok(Some(body.trim().to_string()))
}

/// IMDSv2: a session token first, then the instance id with it.
async fn imds_instance_id() -> std::io::Result<Option<String>> {
    let token = imds_request(
        "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n\
         X-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_string(),
    )
    .await?;
    let Some(token) = token.filter(|t| !t.is_empty() && !t.contains('\n')) else {
        return Ok(None);
    };
    let id = imds_request(format!(
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\
         X-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n"
    ))
    .await?;
    Ok(id.filter(|id| id.starts_with("i-") && id.len() < 64))
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

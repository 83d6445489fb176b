//! Database credentials from AWS Secrets Manager, cached with a TTL.
//!
//! Owns: [`DatabaseSettings`] (the validated `[database]`), reading `[database] secret_id`
//! in the usual Redshift secret shape (`username`, `password`, `host`, `port`, `dbname`),
//! caching it, and producing the job environment
//! (`RSQL_*`, `RSPASSWORD`, and `RSQL_SECRET_ID` naming the secret they came from). The password lives only in memory and in the job's
//! environment: no `Debug`, log line, audit item or callback ever carries it.
//!
//! The agent's one masking function, [`mask`], and what it knows to be secret ([`remember`])
//! live in `rsql_agent_core::masking` (the job owner masks too) and are re-exported here:
//! the configured password and the password of each resolved secret are remembered.
//!
//! Must not touch: jobs or reporting.

use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

pub use rsql_agent_core::masking::{
    mask, mask_json, remember, remember_env, MASK, MIN_MASKED_CHARS,
};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret {secret_id}: {message}")]
    Fetch { secret_id: String, message: String },
    #[error("secret {secret_id} has no SecretString")]
    NoString { secret_id: String },
    // The serde error is left out on purpose: it can quote the secret's text.
    #[error("secret {secret_id} is not the Redshift JSON shape (username, password, host, port, dbname)")]
    Shape { secret_id: String },
}

// The `db_*` aliases are the names the replaced framework's secrets used.
#[derive(Deserialize)]
struct RedshiftSecret {
    #[serde(default, alias = "db_user_name")]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, alias = "db_host_name")]
    host: Option<String>,
    #[serde(default, deserialize_with = "port_from_number_or_string")]
    port: Option<u16>,
    #[serde(default, alias = "db_dbname")]
    dbname: Option<String>,
}

fn port_from_number_or_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u16>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        N(u16),
        S(String),
    }
    Ok(match Option::<Port>::deserialize(d)? {
        None => None,
        Some(Port::N(n)) => Some(n),
        Some(Port::S(s)) => s.trim().parse().ok(),
    })
}

/// Connection settings handed to every job as `RSQL_HOST`, `RSQL_PORT`, `RSQL_USER`,
/// `RSQL_DB` and `RSPASSWORD`.
#[derive(Clone, Default, PartialEq)]
pub struct DatabaseSettings {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub dbname: Option<String>,
    pub password: Option<String>,
    pub secret_id: Option<String>,
    pub secret_ttl: Duration,
}

// Hand-written so that a `{:?}` of the config can never print the password.
impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("secret_id", &self.secret_id)
            .field("secret_ttl", &self.secret_ttl)
            .finish()
    }
}

impl DatabaseSettings {
    /// The job environment these settings produce (secrets resolved elsewhere are merged in
    /// by the caller).
    pub fn job_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(host) = &self.host {
            env.push(("RSQL_HOST".to_string(), host.clone()));
        }
        if let Some(port) = self.port {
            env.push(("RSQL_PORT".to_string(), port.to_string()));
        }
        if let Some(user) = &self.user {
            env.push(("RSQL_USER".to_string(), user.clone()));
        }
        if let Some(db) = &self.dbname {
            env.push(("RSQL_DB".to_string(), db.clone()));
        }
        if let Some(password) = &self.password {
            env.push(("RSPASSWORD".to_string(), password.clone()));
        }
        env
    }
}

/// When the secret was fetched, and the environment made from it.
type CachedEnv = (Instant, Vec<(String, String)>);

/// The job environment for database access, from `[database]` and, when configured, the
/// secret. Explicit config values win over the secret's, except the password, which only the
/// secret holds in that case.
pub struct DatabaseEnv {
    settings: DatabaseSettings,
    client: Option<aws_sdk_secretsmanager::Client>,
    cache: Mutex<Option<CachedEnv>>,
}

impl std::fmt::Debug for DatabaseEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseEnv")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl DatabaseEnv {
    pub fn new(settings: DatabaseSettings, client: Option<aws_sdk_secretsmanager::Client>) -> Self {
        DatabaseEnv {
            settings,
            client,
            cache: Mutex::new(None),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.settings.secret_ttl
    }

    /// The variables for a job. With a secret, it is fetched at most once per TTL.
    pub async fn job_env(&self) -> Result<Vec<(String, String)>, SecretError> {
        let (Some(secret_id), Some(client)) = (&self.settings.secret_id, &self.client) else {
            if let Some(password) = &self.settings.password {
                remember(password);
            }
            return Ok(self.settings.job_env());
        };
        let mut cache = self.cache.lock().await;
        if let Some((at, env)) = cache.as_ref() {
            if at.elapsed() < self.settings.secret_ttl {
                return Ok(env.clone());
            }
        }
        let out = match client.get_secret_value().secret_id(secret_id).send().await {
            Ok(out) => out,
            Err(e) => {
                let error = SecretError::Fetch {
                    secret_id: secret_id.clone(),
                    message: aws_sdk_secretsmanager::error::DisplayErrorContext(&e).to_string(),
                };
                // A stale credential beats a failed nightly run: Secrets Manager being
                // unreachable for a moment must not fail every job that starts meanwhile.
                if let Some((_, env)) = cache.as_ref() {
                    tracing::warn!(error = %error, "cannot refresh the database secret; using the cached one");
                    return Ok(env.clone());
                }
                return Err(error);
            }
        };
        let text = out.secret_string().ok_or_else(|| SecretError::NoString {
            secret_id: secret_id.clone(),
        })?;
        let secret: RedshiftSecret =
            serde_json::from_str(text).map_err(|_| SecretError::Shape {
                secret_id: secret_id.clone(),
            })?;
        // Only the password: the username, host and dbname are identifiers that also turn up
        // in job names, streams and journald fields (a user `rsql` would make
        // `rsql_blog_script_1.sh` read `***_blog_script_1.sh`, break `journalctl JOB_NAME=`
        // lookups and `workflow run --resume`), and none of them opens the database alone.
        if let Some(password) = &secret.password {
            remember(password);
        }
        let merged = DatabaseSettings {
            host: self.settings.host.clone().or(secret.host),
            port: self.settings.port.or(secret.port),
            user: self.settings.user.clone().or(secret.username),
            dbname: self.settings.dbname.clone().or(secret.dbname),
            password: secret.password,
            secret_id: None,
            secret_ttl: self.settings.secret_ttl,
        };
        let mut env = merged.job_env();
        // Which secret these are: the drop-in get_redshift_creds.sh refuses a script that asks
        // for another one rather than hand it the wrong database.
        env.push(("RSQL_SECRET_ID".to_string(), secret_id.clone()));
        tracing::debug!(secret_id = %secret_id, "database secret fetched");
        *cache = Some((Instant::now(), env.clone()));
        Ok(env)
    }
}

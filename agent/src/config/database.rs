//! `[database]`: how jobs reach Redshift. Without the table, the agent's own `RSQL_*` and
//! `RSPASSWORD` environment is used, so a workflow runs with no config file at all.
//!
//! The settings type is [`DatabaseSettings`], which `secrets` owns; this file reads the keys.

use std::time::Duration;

use serde::Deserialize;

use super::{duration_or, KeyError};
use crate::secrets::DatabaseSettings;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    dbname: Option<String>,
    pub(super) password: Option<String>,
    secret_id: Option<String>,
    secret_ttl: Option<String>,
}

const DEFAULT_SECRET_TTL: Duration = Duration::from_secs(300);

impl DatabaseSettings {
    /// Settings taken from the agent's own `RSQL_*`/`RSPASSWORD` environment; used when the
    /// config has no `[database]` table, so a workflow can run with no config file at all.
    pub(super) fn from_process_env() -> DatabaseSettings {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(password) = var("RSPASSWORD") {
            crate::secrets::remember(&password);
        }
        DatabaseSettings {
            host: var("RSQL_HOST"),
            port: var("RSQL_PORT").and_then(|p| p.parse().ok()),
            user: var("RSQL_USER"),
            dbname: var("RSQL_DB"),
            password: var("RSPASSWORD"),
            secret_id: None,
            secret_ttl: DEFAULT_SECRET_TTL,
        }
    }

    pub(super) fn from_raw(raw: RawDatabase) -> Result<DatabaseSettings, KeyError> {
        Ok(DatabaseSettings {
            host: raw.host,
            port: raw.port,
            user: raw.user,
            dbname: raw.dbname,
            password: raw.password,
            secret_id: raw.secret_id,
            secret_ttl: duration_or("database.secret_ttl", raw.secret_ttl, DEFAULT_SECRET_TTL)?,
        })
    }
}

/// A password in the file, or a secret to fetch it from: not both.
pub(super) fn check(database: &DatabaseSettings) -> Result<(), KeyError> {
    if database.password.is_some() && database.secret_id.is_some() {
        return Err((
            "database.password",
            "give either password or secret_id, not both".to_string(),
        ));
    }
    Ok(())
}

//! `ingest keys create|list|revoke`: API keys managed from the command line with the
//! database URL, so that the first key needs nothing but access to Postgres.

use std::io::Write;

use anyhow::Context;
use common::auth;
use time::format_description::well_known::Rfc3339;

use crate::config::{IngestConfig, KeysCommand};

/// Runs one `keys` command, writing its answer to `out`.
pub async fn run(
    config: &IngestConfig,
    command: &KeysCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    config.common.validate()?;
    let pool = common::service::postgres(&config.common).await?;
    match command {
        KeysCommand::Create { tenant, role } => {
            let (id, secret) = auth::create_key(&pool, tenant, *role)
                .await
                .context("creating the key")?;
            writeln!(out, "created key {id}: tenant {tenant}, role {role}")?;
            writeln!(out, "the key is shown this once (only its hash is stored):")?;
            writeln!(out, "{secret}")?;
        }
        KeysCommand::List => {
            let keys = auth::list_keys(&pool).await.context("listing the keys")?;
            writeln!(
                out,
                "{:>6}  {:<32}  {:<10}  {:<10}  {:<20}  revoked",
                "id", "tenant", "role", "key", "created"
            )?;
            for key in keys {
                let revoked = match key.revoked_at {
                    Some(at) => at.format(&Rfc3339)?,
                    None => "-".into(),
                };
                writeln!(
                    out,
                    "{:>6}  {:<32}  {:<10}  {:<10}  {:<20}  {revoked}",
                    key.id,
                    key.tenant,
                    key.role,
                    format!("{}…", key.hint),
                    key.created_at.replace_nanosecond(0)?.format(&Rfc3339)?,
                )?;
            }
        }
        KeysCommand::Revoke { id } => {
            anyhow::ensure!(
                auth::revoke_key(&pool, *id)
                    .await
                    .context("revoking the key")?,
                "no key with id {id} (`ingest keys list` shows them)"
            );
            writeln!(
                out,
                "revoked key {id}: it stops working within {} s on every replica",
                auth::RECHECK_AFTER.as_secs()
            )?;
        }
    }
    Ok(())
}

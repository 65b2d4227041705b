//! `ampora audit`: the newest entries as a table, or every matching entry exported as JSON
//! lines page by page.

use std::io::Write as _;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;

use super::client::{s, Client};
use super::time::parse_time;

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// The newest entries matching the filters.
    List {
        #[command(flatten)]
        filter: AuditFilterArgs,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Every entry matching the filters as JSON lines, oldest first, to stdout
    /// (`ampora audit export --since 24h > audit.jsonl`).
    Export {
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// Stop after this many entries (default: all).
        #[arg(long)]
        limit: Option<u64>,
    },
}

/// Audit filters. Times are an RFC 3339 timestamp (`2025-06-01T12:00:00Z`,
/// `2025-06-01T14:00:00+02:00`) or a duration before now (`90s`, `15m`, `1h`, `7d`).
#[derive(Debug, Args, Clone)]
pub struct AuditFilterArgs {
    /// Entries at or after this time: RFC 3339, or a duration ago such as `1h`.
    #[arg(long)]
    pub since: Option<String>,
    /// Entries before this time: RFC 3339, or a duration ago such as `10m`.
    #[arg(long)]
    pub until: Option<String>,
    /// Entries about this agent (instance uid).
    #[arg(long)]
    pub agent: Option<String>,
    /// Entries by this actor, e.g. `api:admin`, `agent`, `system`.
    #[arg(long)]
    pub actor: Option<String>,
    /// Entries with this reason code, e.g. `revoked`, `scope_mismatch`.
    #[arg(long)]
    pub reason: Option<String>,
}

impl AuditFilterArgs {
    /// The API's query parameters for these filters, times resolved against `now_ms`.
    fn params(&self, now_ms: i64) -> anyhow::Result<Vec<(&'static str, String)>> {
        let mut q = Vec::new();
        if let Some(t) = &self.since {
            q.push(("since_ms", parse_time(t, now_ms)?.to_string()));
        }
        if let Some(t) = &self.until {
            q.push(("until_ms", parse_time(t, now_ms)?.to_string()));
        }
        let texts = [
            ("instance_uid", &self.agent),
            ("actor", &self.actor),
            ("reason", &self.reason),
        ];
        for (k, v) in texts {
            if let Some(v) = v {
                q.push((k, v.clone()));
            }
        }
        Ok(q)
    }
}

pub(super) async fn run(c: &Client, cmd: AuditCmd) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::List { filter, limit } => {
            let mut query = filter.params(shared::now_ms())?;
            query.push(("limit", limit.to_string()));
            let v = c.get("/api/v1/audit", &query).await?;
            let header = [
                ("AT (ms)", 13),
                ("ACTION", 16),
                ("ACTOR", 14),
                ("REASON", 16),
                ("SOURCE", 15),
                ("INSTANCE UID", 0),
            ];
            c.table(&v, header, |e| {
                [
                    e["at_ms"].to_string(),
                    s(e, "action"),
                    s(e, "actor"),
                    s(e, "reason"),
                    s(e, "source_ip"),
                    s(e, "instance_uid"),
                ]
            })
        }
        AuditCmd::Export { filter, limit } => export(c, &filter, limit).await,
    }
}

/// Entries asked for per export request: the server's largest page.
const EXPORT_PAGE: u64 = 10_000;

/// Writes every matching audit entry to stdout as JSON lines, oldest first, one page per
/// request, each page continuing after the last line of the one before. Times are resolved
/// once, so every page has the same window.
async fn export(c: &Client, filter: &AuditFilterArgs, limit: Option<u64>) -> anyhow::Result<()> {
    let base = filter.params(shared::now_ms())?;
    let mut after: Option<String> = None;
    let mut written = 0u64;
    let stdout = std::io::stdout();
    loop {
        let want = limit.map_or(EXPORT_PAGE, |l| (l - written).min(EXPORT_PAGE));
        if want == 0 {
            return Ok(());
        }
        let mut query = base.clone();
        query.push(("limit", want.to_string()));
        if let Some(a) = &after {
            query.push(("after", a.clone()));
        }
        let text = c
            .text(Method::GET, "/api/v1/audit/export", &query, None)
            .await?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        let mut out = stdout.lock();
        for line in &lines {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        written += lines.len() as u64;
        if (lines.len() as u64) < want {
            return Ok(());
        }
        let Some(last) = lines.last() else {
            return Ok(());
        };
        let last: Value = serde_json::from_str(last).context("export returned a bad line")?;
        let (Some(at_ms), Some(id)) = (last["at_ms"].as_i64(), last["id"].as_i64()) else {
            bail!("export line without at_ms and id");
        };
        after = Some(format!("{at_ms}.{id}"));
    }
}

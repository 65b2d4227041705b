//! The few Ampora REST calls the harness needs, with the admin API token.

use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use shared::rollout::Rollout;

/// Largest batch asked for in one request (the API allows 100,000).
const TOKEN_BATCH: usize = 20_000;

#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    pub fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| what.to_string())?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{what}: {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("{what}: bad JSON"))
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let req = self.http.post(format!("{}{path}", self.base)).json(&body);
        self.send(req, &format!("POST {path}")).await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let req = self.http.get(format!("{}{path}", self.base));
        self.send(req, &format!("GET {path}")).await
    }

    /// `n` single-use bootstrap tokens, created in bulk the way a fleet is provisioned.
    pub async fn bootstrap_tokens(&self, n: usize, ttl_secs: u64) -> anyhow::Result<Vec<String>> {
        self.bootstrap_tokens_named("loadtest", n, ttl_secs).await
    }

    /// [`Api::bootstrap_tokens`] under `name` (which [`Api::token_ids_named`] finds again).
    pub async fn bootstrap_tokens_named(
        &self,
        name: &str,
        n: usize,
        ttl_secs: u64,
    ) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let count = (n - out.len()).min(TOKEN_BATCH);
            let v = self
                .post(
                    "/api/v1/tokens/batch",
                    json!({ "name": name, "ttl_secs": ttl_secs, "count": count }),
                )
                .await?;
            let tokens = v["tokens"].as_array().context("no tokens in response")?;
            for t in tokens {
                out.push(t.as_str().context("token is not a string")?.to_string());
            }
            if tokens.is_empty() {
                bail!("the server returned no tokens");
            }
        }
        Ok(out)
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("DELETE {path}"))?;
        let status = resp.status();
        if !status.is_success() {
            bail!("DELETE {path}: {status}: {}", resp.text().await?);
        }
        Ok(())
    }

    /// The ids of the bootstrap tokens named `name`.
    pub async fn token_ids_named(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let v = self.get("/api/v1/tokens").await?;
        let list = v.as_array().context("token list")?;
        Ok(list
            .iter()
            .filter(|t| t["name"] == name)
            .filter_map(|t| t["id"].as_str().map(str::to_string))
            .collect())
    }

    pub async fn revoke_token(&self, id: &str) -> anyhow::Result<()> {
        self.delete(&format!("/api/v1/tokens/{id}")).await
    }

    /// Audit rows with `reason` at or after `since_ms` (at most 10,000, newest first).
    pub async fn audit(&self, reason: &str, since_ms: u64) -> anyhow::Result<Vec<Value>> {
        let v = self
            .get(&format!(
                "/api/v1/audit?reason={reason}&since_ms={since_ms}&limit=10000"
            ))
            .await?;
        Ok(v.as_array().context("audit list")?.clone())
    }

    /// Creates a YAML config version; returns its id.
    pub async fn create_config(&self, name: &str, body: &str) -> anyhow::Result<i64> {
        Ok(self.create_config_hashed(name, body).await?.0)
    }

    /// Creates a YAML config version; returns its id and hash (hex).
    pub async fn create_config_hashed(
        &self,
        name: &str,
        body: &str,
    ) -> anyhow::Result<(i64, String)> {
        let v = self
            .post(
                "/api/v1/configs",
                json!({ "name": name, "body": body, "content_type": "text/yaml" }),
            )
            .await?;
        let id = v["id"].as_i64().context("config id")?;
        Ok((id, v["hash"].as_str().context("config hash")?.to_string()))
    }

    /// Assigns a config to every agent; returns the number of matched agents.
    pub async fn assign_all(&self, config_id: i64) -> anyhow::Result<u64> {
        let v = self
            .post(
                "/api/v1/assignments",
                json!({ "config_id": config_id, "all": true }),
            )
            .await?;
        Ok(v["matched_agents"].as_u64().unwrap_or(0))
    }

    /// Creates a staged rollout (`body` as `POST /api/v1/rollouts` takes it); returns the
    /// rollout as recorded.
    pub async fn create_rollout(&self, body: Value) -> anyhow::Result<Rollout> {
        let v = self.post("/api/v1/rollouts", body).await?;
        serde_json::from_value(v).context("POST /api/v1/rollouts: not a rollout")
    }

    /// Rollout `id` as recorded, from the list (which reads no agents, unlike the status
    /// view: cheap enough to poll).
    pub async fn rollout(&self, id: i64) -> anyhow::Result<Rollout> {
        let v = self.get("/api/v1/rollouts").await?;
        let all: Vec<Rollout> =
            serde_json::from_value(v).context("GET /api/v1/rollouts: not a list of rollouts")?;
        all.into_iter()
            .find(|r| r.id == id)
            .with_context(|| format!("rollout {id} is not in the list"))
    }

    /// Number of agents in a config state (none, pending, applied, failed, drifted), from the
    /// counts endpoint (no list of 100,000 agents per poll).
    pub async fn count_in_state(&self, state: &str) -> anyhow::Result<usize> {
        let v = self
            .get(&format!("/api/v1/agents/counts?config_state={state}"))
            .await?;
        let n = v["matched"].as_u64().context("agent counts: matched")?;
        Ok(usize::try_from(n)?)
    }
}

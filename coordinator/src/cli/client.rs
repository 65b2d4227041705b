//! The one request helper every operator command uses: where the server is, which token to
//! send, how an error status becomes the command's error, and how a result is printed (a
//! table, or the JSON with `--json`).

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Args;
use reqwest::Method;
use serde_json::Value;

/// How operator commands reach the server. Global: it may follow any subcommand.
#[derive(Debug, Args, Clone)]
pub struct ApiArgs {
    /// Base URL of the Ampora API.
    #[arg(
        long,
        env = "AMPORA_SERVER",
        default_value = "http://127.0.0.1:4320",
        global = true
    )]
    pub server: String,
    /// API token; defaults to the admin token in `--data-dir`.
    #[arg(long, env = "AMPORA_API_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory whose admin-token file is used when no token is given.
    #[arg(long, default_value = "ampora-data", global = true)]
    pub data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

pub(super) struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    json: bool,
}

impl Client {
    pub(super) fn new(api: &ApiArgs) -> anyhow::Result<Self> {
        let token = match &api.token {
            Some(t) => t.clone(),
            None => {
                let path = api.data_dir.join("admin-token");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "no --token given and cannot read {} (set AMPORA_API_TOKEN or --data-dir)",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_string()
            }
        };
        Ok(Self {
            http: reqwest::Client::new(),
            base: api.server.trim_end_matches('/').to_string(),
            token,
            json: api.json,
        })
    }

    /// Whether `--json` was given.
    pub(super) fn json(&self) -> bool {
        self.json
    }

    pub(super) async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.call(Method::GET, path, query, None).await
    }

    pub(super) async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(Method::POST, path, &[], Some(body)).await
    }

    /// A POST without a body: an action on a resource.
    pub(super) async fn post_empty(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::POST, path, &[], None).await
    }

    pub(super) async fn put(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(Method::PUT, path, &[], Some(body)).await
    }

    pub(super) async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::DELETE, path, &[], None).await
    }

    /// POSTs nothing but the query and headers; fails with the server's answer unless it is a
    /// success.
    pub(super) async fn check(
        &self,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let req = self.post_with(path, query, headers)?;
        self.send_raw(req).await.map(|_| ())
    }

    /// POSTs a file as the request body, streamed from disk, with extra headers.
    pub(super) async fn upload(
        &self,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
        file: &std::path::Path,
    ) -> anyhow::Result<Value> {
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("reading {}", file.display()))?;
        let req = self
            .post_with(path, query, headers)?
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::from(f));
        let text = self.send_raw(req).await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A POST of no body to `path` with `query` and extra `headers`; the answer's JSON.
    pub(super) async fn post_query(
        &self,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
    ) -> anyhow::Result<Value> {
        let text = self.send_raw(self.post_with(path, query, headers)?).await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A POST to `path` with the token, `query` and extra `headers`.
    fn post_with(
        &self,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base))
            .with_context(|| format!("bad server url {}", self.base))?;
        url.query_pairs_mut().extend_pairs(query);
        let mut req = self.http.post(url).bearer_auth(&self.token);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        Ok(req)
    }

    /// Sends `req`: the body of a success as text, else the error with the server's message.
    async fn send_raw(&self, req: reqwest::RequestBuilder) -> anyhow::Result<String> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        Self::answer(resp).await
    }

    /// A JSON response; an empty body is `null`. Query values are encoded here, so any value
    /// is safe to pass.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let text = self.text(method, path, query, body).await?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// The body of a successful response as text; an error status becomes the error, with
    /// the server's `error` message when it sent one.
    pub(super) async fn text(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> anyhow::Result<String> {
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base))
            .with_context(|| format!("bad server url {}", self.base))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut req = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send_raw(req).await
    }

    /// A response's body as text, or its error status with the server's message.
    async fn answer(resp: reqwest::Response) -> anyhow::Result<String> {
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or(text);
            bail!("{status}: {msg}");
        }
        Ok(text)
    }

    /// Prints `v` as JSON with `--json`, else as `human` renders it.
    pub(super) fn print(&self, v: &Value, human: impl Fn(&Value)) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v)?);
        } else {
            human(v);
        }
        Ok(())
    }

    /// Prints a list response as a table (or JSON with `--json`): one row per element, the
    /// columns `row` returns in the order of `header`.
    pub(super) fn table<const N: usize>(
        &self,
        v: &Value,
        header: [(&str, usize); N],
        row: impl Fn(&Value) -> [String; N],
    ) -> anyhow::Result<()> {
        self.print(v, |v| print_table(v, header, &row))
    }
}

/// Prints a JSON array as a table whatever `--json` says: for a list inside a resource
/// printed another way (a group's agents).
pub(super) fn print_table<const N: usize>(
    v: &Value,
    header: [(&str, usize); N],
    row: impl Fn(&Value) -> [String; N],
) {
    let widths = header.map(|(_, w)| w);
    println!("{}", line(header.map(|(h, _)| h.to_string()), widths));
    for item in v.as_array().into_iter().flatten() {
        println!("{}", line(row(item), widths));
    }
}

/// Cells padded to their widths, two spaces apart; the last one unpadded.
fn line<const N: usize>(cells: [String; N], widths: [usize; N]) -> String {
    let mut out = String::new();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        if i + 1 == N {
            out.push_str(cell);
        } else {
            out.push_str(&format!("{cell:<width$}  "));
        }
    }
    out
}

/// Prints one resource as indented JSON (shown whole, whatever `--json` says).
pub(super) fn show(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A string field of a JSON object, `-` when absent.
pub(super) fn s(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("-").to_string()
}

/// `text` as one path segment: every byte but the unreserved ones percent-encoded, so a group
/// named `eu/west?` stays one segment.
pub(super) fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A JSON object of labels as `k=v,k=v`; `-` when there are none.
pub(super) fn label_text(labels: &Value) -> String {
    let pairs: Vec<String> = labels
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
        .collect();
    if pairs.is_empty() {
        "-".into()
    } else {
        pairs.join(",")
    }
}

/// `key=value` pairs as a JSON object.
pub(super) fn labels(pairs: &[String]) -> anyhow::Result<serde_json::Map<String, Value>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .with_context(|| format!("label `{p}` is not key=value"))
        })
        .collect()
}

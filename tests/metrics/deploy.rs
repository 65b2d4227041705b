//! The Grafana dashboard (`deploy/grafana/ampora-fleet.json`) and the alert rules
//! (`deploy/prometheus/ampora-alerts.yml`) name only metrics Ampora exports: a renamed or
//! misspelt metric would leave a panel empty or an alert silent without any error. Each test
//! starts Ampora (embedded, then the cluster sandbox), drives agents over both transports,
//! pushes a config that one agent fails, gets one authentication refused, scrapes `/metrics`
//! from the API listener and every gateway, and checks every name the PromQL uses against the
//! sample names scraped. It also checks that each latency histogram was recorded during the
//! test, so the histograms are wired into that mode and not merely left over in the
//! process-wide registry by another test.
//!
//! In this binary because driving agents moves the counters that its other tests assert
//! exactly.

use std::collections::BTreeSet;
use std::path::PathBuf;

use agent::{wait_for, Agent, AgentOptions, ClientError, HttpTransport};
use anyhow::Context as _;
use serde_json::{json, Value};
use shared::ids::InstanceUid;
use tests::cluster::Cluster;
use tests::{bearer, eventually, hello, Api, TestServer, DEADLINE};

use crate::{alone, OneShot, Scrape};

/// Series Prometheus makes itself, not scraped from Ampora.
const SYNTHETIC: &[&str] = &["up"];

/// Each latency histogram, with a label its own series carry: the bus histogram shares its
/// name with the NATS bus's unlabelled one, which must not pass for the gateway's.
const HISTOGRAMS: &[(&str, &str)] = &[
    ("ampora_store_query_duration_seconds", "op="),
    ("ampora_bus_request_duration_seconds", "kind=\"frame\""),
    ("ampora_api_request_duration_seconds", "route="),
    ("ampora_opamp_message_duration_seconds", "transport="),
];

fn deploy_file(rel: &str) -> anyhow::Result<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Every PromQL expression of the dashboard's panels (rows' nested panels included).
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Array(targets)) = m.get("targets") {
                    out.extend(
                        targets
                            .iter()
                            .filter_map(|t| t["expr"].as_str().map(str::to_string)),
                    );
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// Every `expr:` of a rules file: inline, or a block scalar (`|`, `>`, with chomping
/// indicators) of the lines indented deeper than its key.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(block.join("\n").trim().to_string());
        } else {
            out.push(rest.trim_matches(|c| c == '\'' || c == '"').to_string());
        }
    }
    out
}

/// Words of PromQL that are not metric names wherever they stand: operators, literals, and
/// the aggregations, which may be followed by `by (...)` rather than by their `(`.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Modifiers whose parenthesised list names labels, not metrics.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Index just past the bracket closing the one at `open`, skipping quoted strings inside.
fn skip_group(c: &[char], open: usize, close: char) -> usize {
    let mut i = open + 1;
    while i < c.len() && c[i] != close {
        i = if matches!(c[i], '"' | '\'' | '`') {
            skip_string(c, i)
        } else {
            i + 1
        };
    }
    i + 1
}

/// Index just past the string literal starting at `i`.
fn skip_string(c: &[char], i: usize) -> usize {
    let quote = c[i];
    let mut j = i + 1;
    while j < c.len() && c[j] != quote {
        j += if c[j] == '\\' && quote != '`' { 2 } else { 1 };
    }
    j + 1
}

fn is_ident(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || ch == '_' || ch == ':'
}

/// The metric names a PromQL expression selects: identifiers standing bare or before `{` or
/// `[`, not functions (followed by `(`), keywords, label names of `by (...)` and the like,
/// label matchers, range and duration literals, numbers, strings or Grafana variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let c: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if matches!(ch, '"' | '\'' | '`') {
            i = skip_string(&c, i);
        } else if ch == '{' {
            i = skip_group(&c, i, '}');
        } else if ch == '[' {
            i = skip_group(&c, i, ']');
        } else if ch == '$'
            || ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // A Grafana variable, a number (`0.99`, `1e3`) or a duration (`5m`).
            i += 1;
            while i < c.len() && (is_ident(c[i]) || c[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let mut next = i;
            while next < c.len() && c[next].is_whitespace() {
                next += 1;
            }
            let before_paren = c.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) {
                if before_paren {
                    i = skip_group(&c, next, ')');
                }
            } else if !before_paren && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The names of the samples on a `/metrics` page, as rendered (`_total`, `_bucket`, `_sum`,
/// `_count` included, so a histogram is only found under the suffixes it really has).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Sum of `name_count` over the series whose labels contain `with`.
fn observations(text: &str, name: &str, with: &str) -> f64 {
    let prefix = format!("{name}_count");
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(prefix.as_str()) && l.contains(with))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Every metric name the dashboard and the rules use, with where it is used.
fn required_names() -> anyhow::Result<Vec<(String, String)>> {
    let dashboard: Value = serde_json::from_str(&deploy_file("grafana/ampora-fleet.json")?)?;
    let rules = deploy_file("prometheus/ampora-alerts.yml")?;
    let alerts = rules
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    let panel_exprs = dashboard_exprs(&dashboard);
    let rule_exprs = rule_exprs(&rules);
    // A parser that found nothing would make the check pass vacuously.
    anyhow::ensure!(
        rule_exprs.len() == alerts && alerts >= 8,
        "{} exprs for {alerts} alerts",
        rule_exprs.len()
    );
    anyhow::ensure!(
        panel_exprs.len() >= 20,
        "only {} panel exprs",
        panel_exprs.len()
    );
    let mut out = Vec::new();
    for (source, exprs) in [("dashboard", panel_exprs), ("alert rules", rule_exprs)] {
        for expr in exprs {
            let names = metric_names(&expr);
            anyhow::ensure!(
                !names.is_empty(),
                "no metric found in {source} expr {expr:?}"
            );
            out.extend(
                names
                    .into_iter()
                    .filter(|n| !SYNTHETIC.contains(&n.as_str()))
                    .map(|n| (n, format!("{source}: {expr}"))),
            );
        }
    }
    Ok(out)
}

fn agent(ws_or_http_url: String, token: String, fail: bool) -> Agent {
    Agent::start(AgentOptions {
        endpoint: ws_or_http_url,
        token: Some(token),
        instance_uid: Some(InstanceUid::new_v7().0),
        description: vec![("service.name".into(), "dashboard-collector".into())],
        non_identifying: vec![("env".into(), "dashboard".into())],
        heartbeat: std::time::Duration::from_millis(200),
        fail_configs: fail,
        ..AgentOptions::default()
    })
}

/// Agents over WebSocket and plain HTTP (one per URL pair), a config pushed to them that the
/// `failing` ones report FAILED, and one refused authentication. Returns the agents, for
/// stopping.
async fn drive(api: &Api, urls: &[(String, String)]) -> anyhow::Result<Vec<Agent>> {
    let mut agents = Vec::new();
    let mut expect = Vec::new();
    for (ws, http) in urls {
        for (url, fail) in [(ws, false), (ws, true), (http, false)] {
            let a = agent(url.clone(), api.token("dashboard").await?, fail);
            let s = wait_for(&mut a.status(), DEADLINE, |s| s.connected && s.replies > 0).await?;
            let uid = InstanceUid(s.instance_uid.context("an assigned uid")?).to_string();
            expect.push((uid, if fail { "failed" } else { "applied" }));
            agents.push(a);
        }
    }
    let (id, _) = api.config("dashboard", "exporters: {}\n").await?;
    api.assign(json!({ "config_id": id, "labels": { "env": "dashboard" } }))
        .await?;
    for (uid, state) in &expect {
        api.wait_agent(uid, state, |a| a["config_state"] == *state)
            .await?;
    }
    let mut refused = HttpTransport::new(&urls[0].1, bearer("amp-bs.aaaaaaaa.00000000"), false);
    match refused.exchange(&hello(InstanceUid::new_v7())).await {
        Err(ClientError::Status { status: 401, .. }) => {}
        other => anyhow::bail!("a malformed token must be refused with 401, got {other:?}"),
    }
    Ok(agents)
}

/// Waits until the scrapes, together, hold every required name and show each histogram
/// recorded since `before`; fails naming what is missing.
async fn check(scrapes: &[&dyn DynScrape], before: &str) -> anyhow::Result<()> {
    let required = required_names()?;
    eventually(
        "every dashboard and alert metric scraped",
        DEADLINE,
        || async {
            let mut texts = Vec::new();
            for s in scrapes {
                texts.push(s.text_dyn().await?);
            }
            let found: BTreeSet<String> = texts.iter().flat_map(|t| sample_names(t)).collect();
            let missing: BTreeSet<&(String, String)> = required
                .iter()
                .filter(|(name, _)| !found.contains(name))
                .collect();
            anyhow::ensure!(missing.is_empty(), "not exported: {missing:#?}");
            for (name, with) in HISTOGRAMS {
                let after: f64 = texts.iter().map(|t| observations(t, name, with)).sum();
                let earlier = observations(before, name, with);
                anyhow::ensure!(
                    after > earlier,
                    "{name} ({with}) not recorded during the test: {earlier} -> {after}"
                );
            }
            Ok(Some(()))
        },
    )
    .await
}

/// [`Scrape`] behind a reference of one type, for a list of scrape targets.
trait DynScrape: Sync {
    fn text_dyn(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<String>> + Send + '_>>;
}

impl<T: Scrape + Sync> DynScrape for T {
    fn text_dyn(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<String>> + Send + '_>>
    {
        Box::pin(self.text())
    }
}

#[tokio::test]
async fn dashboard_and_alert_metrics_exist_embedded() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start().await?;
    let api = &server.api;
    let before = api.metrics_text().await?;
    let agents = drive(api, &[(server.ws_url(), server.http_url())]).await?;
    check(&[api], &before).await?;
    for a in agents {
        a.stop().await;
    }
    server.stop().await
}

#[tokio::test]
async fn dashboard_and_alert_metrics_exist_in_a_cluster() -> anyhow::Result<()> {
    let _alone = alone().await;
    let cluster = Cluster::start(2, 1, |_| {}).await?;
    let api = cluster.api_of(0)?;
    let before = api.metrics_text().await?;
    let urls = [
        (cluster.ws_url_of(0)?, cluster.http_url_of(0)?),
        (cluster.ws_url_of(1)?, cluster.http_url_of(1)?),
    ];
    let agents = drive(&api, &urls).await?;
    let gateways = [
        OneShot(cluster.gateway_addr(0)?),
        OneShot(cluster.gateway_addr(1)?),
    ];
    check(&[&api, &gateways[0], &gateways[1]], &before).await?;
    for a in agents {
        a.stop().await;
    }
    cluster.stop().await
}

#[test]
fn metric_names_are_found_in_promql() {
    let got = metric_names(
        r#"histogram_quantile(0.99, sum by (le, kind) (rate(a_bucket{kind!="",job=~"$gw"}[$__rate_interval])))
           / on(instance) group_left(node) b offset 5m > bool 1e3 and c unless max without (x) (d:rec[5m:1m])
           or vector(0) + ignoring (y) e{f="g{h}"} - 'i'"#,
    );
    let want: BTreeSet<String> = ["a_bucket", "b", "c", "d:rec", "e"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(got, want);
}

#[test]
fn rule_exprs_are_read_inline_and_as_blocks() {
    let yaml = "groups:\n  - rules:\n      - alert: A\n        expr: |\n          sum(x)\n            > 1\n        for: 1m\n      - alert: B\n        expr: 'up == 0'\n";
    assert_eq!(rule_exprs(yaml), vec!["sum(x)\n> 1", "up == 0"]);
}

#[test]
fn sample_names_keep_the_rendered_suffixes() {
    let text = "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1\nh_count 2\nc_total{r=\"x\"} 3\n";
    let got = sample_names(text);
    assert!(got.contains("h_bucket") && got.contains("c_total"));
    assert!(!got.contains("h") && !got.contains("c"));
    assert_eq!(observations(text, "h", ""), 2.0);
}

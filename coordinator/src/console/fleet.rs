//! The Fleet page: every agent with its connection, health, service, labels, remote-config
//! state, last contact and gateway; filters; counts per state; keyset pages; and live updates
//! (a Server-Sent Events stream telling the page when to fetch its rows again).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use maud::{html, Markup};
use serde::{Deserialize, Serialize};
use shared::domain::AgentRecord;
use shared::ids::InstanceUid;

use super::session::Signed;
use super::view::{self, when};
use crate::service::fleet::{ConfigView, FleetPage, FleetQuery, HealthState};
use crate::service::Coordinator;

/// Agents per page.
const PAGE: usize = 50;

/// How often a live page is told to refresh at most; in cluster mode, where other
/// coordinators' changes are not seen here, also how often it refreshes anyway (x3).
const LIVE_TICK: Duration = Duration::from_secs(1);

/// The filters as the page's query string carries them (all text, so a bad value is shown
/// as an error instead of failing the request).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
pub(super) struct FleetParams {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    label: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    health: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    config: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    capability: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    gateway: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    connected: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    upgrade: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    drops: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    q: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    after: String,
}

impl FleetParams {
    fn query(&self) -> Result<FleetQuery, String> {
        let opt = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        Ok(FleetQuery {
            labels: view::parse_labels(&self.label)
                .ok_or_else(|| format!("label filter `{}` is not key=value,…", self.label))?,
            health: opt(&self.health)
                .map(|h| HealthState::parse(&h).ok_or(format!("unknown health `{h}`")))
                .transpose()?,
            config: opt(&self.config)
                .map(|c| ConfigView::parse(&c).ok_or(format!("unknown config state `{c}`")))
                .transpose()?,
            capability: opt(&self.capability)
                .map(|c| {
                    proto::agent_caps::NAMES
                        .iter()
                        .find(|(_, n)| n.eq_ignore_ascii_case(&c))
                        .map(|(bit, _)| *bit)
                        .ok_or(format!("unknown capability `{c}`"))
                })
                .transpose()?,
            gateway: opt(&self.gateway),
            connected: match self.connected.as_str() {
                "" => None,
                "true" | "yes" => Some(true),
                "false" | "no" => Some(false),
                other => return Err(format!("connected must be true or false, not `{other}`")),
            },
            upgrading: match self.upgrade.as_str() {
                "" | "available" => None,
                "unfinished" => Some(true),
                "none" => Some(false),
                other => {
                    return Err(format!(
                        "upgrade must be available, unfinished or none, not `{other}`"
                    ))
                }
            },
            upgrade_available: self.upgrade == "available",
            drops: match self.drops.as_str() {
                "" => false,
                "true" | "yes" => true,
                other => return Err(format!("drops must be true, not `{other}`")),
            },
            now_ms: 0,
            newest_builds: Default::default(),
            text: opt(&self.q),
            after: opt(&self.after)
                .map(|a| {
                    a.parse::<InstanceUid>()
                        .map_err(|_| format!("bad page cursor `{a}`"))
                })
                .transpose()?,
            limit: PAGE,
        })
    }

    /// This page's query string with `key` set to `value` (the cursor reset).
    fn with(&self, key: &str, value: &str) -> String {
        let mut p = self.clone();
        p.after.clear();
        match key {
            "health" => p.health = value.into(),
            "config" => p.config = value.into(),
            "connected" => p.connected = value.into(),
            "after" => p.after = value.into(),
            _ => {}
        }
        format!(
            "/ui/?{}",
            serde_urlencoded::to_string(&p).unwrap_or_default()
        )
    }
}

pub(super) async fn page(
    State(c): State<Arc<Coordinator>>,
    who: Signed,
    Query(p): Query<FleetParams>,
) -> Response {
    let (live, error) = match p.query() {
        Ok(q) => match c.fleet_page(&q).await {
            Ok(page) => (Some(live_section(&p, &page)), None),
            Err(e) => return view::error_page(Some(&who), &e.into()),
        },
        Err(e) => (None, Some(e)),
    };
    let rows_url = format!(
        "/ui/fleet/rows?{}",
        serde_urlencoded::to_string(&p).unwrap_or_default()
    );
    let body = html! {
        h1 { "Fleet" }
        (filters(&p))
        @if let Some(e) = error { p.error { (e) } }
        div #fleet-live data-rows=(rows_url) data-events="/ui/fleet/events" {
            @if let Some(live) = live { (live) }
        }
    };
    view::page("Fleet", Some(&who), body).into_response()
}

/// The live part alone, fetched again by the page when the stream says something changed.
pub(super) async fn rows(
    State(c): State<Arc<Coordinator>>,
    who: Signed,
    Query(p): Query<FleetParams>,
) -> Response {
    match p.query() {
        Ok(q) => match c.fleet_page(&q).await {
            Ok(page) => live_section(&p, &page).into_response(),
            Err(e) => view::error_page(Some(&who), &e.into()),
        },
        Err(e) => html! { p.error { (e) } }.into_response(),
    }
}

/// Tells the page to refresh: at most once a tick, when this coordinator saw an agent
/// change (and every few ticks anyway when other coordinators serve agents too).
pub(super) async fn events(
    State(c): State<Arc<Coordinator>>,
    _who: Signed,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::unfold(
        (c.clone(), c.fleet_generation(), 0u32),
        |(c, seen, ticks)| async move {
            let mut ticks = ticks;
            loop {
                tokio::time::sleep(LIVE_TICK).await;
                ticks += 1;
                let now = c.fleet_generation();
                if now != seen || (!c.serves_every_partition() && ticks % 3 == 0) {
                    let ev = Event::default().event("changed").data(now.to_string());
                    return Some((Ok(ev), (c, now, ticks)));
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn filters(p: &FleetParams) -> Markup {
    html! {
        form.filters method="get" action="/ui/" {
            input type="search" name="q" value=(p.q) placeholder="name or uid";
            input type="text" name="label" value=(p.label) placeholder="env=prod,region=eu";
            select name="health" {
                option value="" { "any health" }
                @for h in HealthState::ALL {
                    option value=(h.as_str()) selected[p.health == h.as_str()] { (h.as_str()) }
                }
            }
            select name="config" {
                option value="" { "any config state" }
                @for s in ConfigView::all() {
                    option value=(s.as_str()) selected[p.config == s.as_str()] { (config_label(s)) }
                }
            }
            select name="capability" {
                option value="" { "any capability" }
                @for (_, name) in proto::agent_caps::NAMES {
                    option value=(name) selected[p.capability == name] { (name) }
                }
            }
            select name="connected" {
                option value="" { "connected or not" }
                option value="true" selected[p.connected == "true"] { "connected" }
                option value="false" selected[p.connected == "false"] { "disconnected" }
            }
            select name="upgrade" {
                option value="" { "any upgrade" }
                option value="available" selected[p.upgrade == "available"] { "upgrade available" }
                option value="unfinished" selected[p.upgrade == "unfinished"] { "upgrade unfinished" }
                option value="none" selected[p.upgrade == "none"] { "no upgrade under way" }
            }
            select name="drops" {
                option value="" { "any throughput" }
                option value="true" selected[p.drops == "true"] { "drops data" }
            }
            input type="text" name="gateway" value=(p.gateway) placeholder="gateway";
            button type="submit" { "Filter" }
            a href="/ui/" { "Clear" }
        }
    }
}

fn config_label(s: ConfigView) -> &'static str {
    match s {
        ConfigView::CannotReceive => "cannot receive",
        other => other.as_str(),
    }
}

fn live_section(p: &FleetParams, page: &FleetPage) -> Markup {
    let counts = &page.counts;
    let now = shared::now_ms();
    html! {
        div.counts {
            span.count { strong { (counts.matched) } " agents" }
            a.count href=(p.with("connected", "true")) { strong { (counts.connected) } " connected" }
            @for h in HealthState::ALL {
                a class={"count health-" (h.as_str())} href=(p.with("health", h.as_str())) {
                    strong { (counts.health(h)) } " " (h.as_str())
                }
            }
            @for s in ConfigView::all() {
                a class={"count config-" (s.as_str())} href=(p.with("config", s.as_str())) {
                    strong { (counts.config(s)) } " " (config_label(s))
                }
            }
        }
        table.fleet {
            thead { tr {
                th { "Agent" } th { "Status" } th { "Health" } th { "Version" } th { "Labels" }
                th { "Config" } th.num { "In" } th.num { "Out" } th.num { "Dropped" }
                th { "Last seen" } th { "Gateway" }
            } }
            tbody {
                @for a in &page.rows { (row(a, now)) }
                @if page.rows.is_empty() { tr { td colspan="11" { "No agents match." } } }
            }
        }
        @if let Some(next) = page.next {
            p.pager { a href=(p.with("after", &next.to_string())) { "Next page →" } }
        }
    }
}

fn row(a: &AgentRecord, now_ms: i64) -> Markup {
    use super::throughput::per_second;
    let rates = a.throughput.as_ref().and_then(|t| t.current(now_ms));
    let uid = a.instance_uid.to_string();
    let name = a
        .description
        .get_str("service.name")
        .unwrap_or_else(|| "(unnamed)".into());
    let health = HealthState::of(a);
    let config = ConfigView::of(a);
    html! {
        tr data-uid=(uid) {
            td { a href={"/ui/agents/" (uid)} { (name) } br; small.uid { (uid) } }
            td { @if a.connected { span.chip.ok { "connected" } } @else { span.chip.off { "disconnected" } } }
            td { span class={"chip health-" (health.as_str())} { (health.as_str()) } }
            td { (a.description.get_str("service.version").unwrap_or_default()) }
            td.labels {
                @for (k, v) in &a.description.non_identifying {
                    span.label { (k) "=" (value_text(v)) }
                }
            }
            td { span class={"chip config-" (config.as_str())} { (config_label(config)) } }
            @match rates {
                Some(r) => {
                    td.num { (per_second(r.in_per_s)) }
                    td.num { (per_second(r.out_per_s)) }
                    td.num.(if r.dropped_per_s > 0.0 { "bad" } else { "" }) { (per_second(r.dropped_per_s)) }
                }
                None => { td.num.muted { "-" } td.num.muted { "-" } td.num.muted { "-" } }
            }
            td { (when(Some(a.last_seen_ms))) }
            td { (a.gateway.as_deref().unwrap_or("-")) }
        }
    }
}

/// An attribute value as text: strings as they are, anything else as JSON.
pub(super) fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

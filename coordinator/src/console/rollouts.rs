//! Staged rollouts: the list (newest first) with the form creating one, and one rollout's
//! page: its state and reason, each stage's live progress and gate verdict (the first failing
//! agents linked), the agents it cannot reach or judge, its history, and the operator actions
//! its state allows. The page's live part is fetched again by `console.js` every few seconds
//! until the rollout reaches a final state. Writes call what `POST /api/v1/rollouts` and
//! `POST /api/v1/rollouts/{id}/{action}` call (`api::rollouts::{plan, act}`), as operator.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;
use shared::domain::{Role, Target};
use shared::rollout::{GateResult, OnFailure, PackageChange, Rollout, RolloutEvent, RolloutState};

use super::session::{Nothing, Posted, Signed};
use super::view::{self, csrf, when};
use crate::api::guard::Operator;
use crate::api::rollouts::{act as act_on, plan, NewRolloutBody};
use crate::api::ApiError;
use crate::service::rollouts::actions::{Action, RolloutStatus, StageStatus};
use crate::service::Coordinator;

/// Rollouts listed; older ones are in the API.
const LISTED: usize = 200;

/// History rows shown on a rollout's page (the newest).
const HISTORY: usize = 200;

/// Config version ids to names, for tables naming a rollout's version.
async fn config_names(c: &Coordinator) -> HashMap<i64, String> {
    c.store()
        .list_configs()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v.id, v.name))
        .collect()
}

pub(super) async fn list(State(c): State<Arc<Coordinator>>, who: Signed) -> Response {
    let mut rollouts = match c.store().list_rollouts().await {
        Ok(r) => r,
        Err(e) => return view::error_page(Some(&who), &e.into()),
    };
    rollouts.reverse();
    rollouts.truncate(LISTED);
    let names = config_names(&c).await;
    let body = html! {
        h1 { "Rollouts" }
        (rollouts_table(&rollouts, &names))
        @if who.may(Role::Operator) { (new_rollout_form(&c, &who).await) }
    };
    view::page("Rollouts", Some(&who), body).into_response()
}

/// An upgrade's package and version, linked to the Packages page.
fn package_text(p: &PackageChange) -> Markup {
    html! {
        a href="/ui/packages" {
            "package " @if p.name.is_empty() { "(the agent)" } @else { code { (p.name) } }
        }
        " " code { (p.version) }
    }
}

/// A table of rollouts as given (the Rollouts page, a config version's page).
pub(super) fn rollouts_table(rollouts: &[Rollout], names: &HashMap<i64, String>) -> Markup {
    html! {
        table #rollouts {
            thead { tr {
                th { "Rollout" } th { "Rolls out" } th { "Target" } th { "State" } th { "Stage" }
                th { "Created by" } th { "Created" }
            } }
            tbody {
                @for r in rollouts {
                    tr data-rollout=(r.id) {
                        td { a href={"/ui/rollouts/" (r.id)} { "#" (r.id) } }
                        td {
                            @if let Some(p) = &r.package {
                                (package_text(p))
                            } @else {
                                "config " a href={"/ui/configs/" (r.config_id)} { (r.config_id) }
                                @if let Some(n) = names.get(&r.config_id) { " · " (n) }
                            }
                        }
                        td { (target_text(r)) }
                        td { (state_chip(r.state)) }
                        td { (stage_text(r)) }
                        td { (r.author) }
                        td { (when(Some(r.created_ms))) }
                    }
                }
                @if rollouts.is_empty() { tr { td colspan="7" { "No rollouts yet." } } }
            }
        }
    }
}

fn state_chip(s: RolloutState) -> Markup {
    html! { span class={"chip rollout-" (s.as_str())} { (s.as_str()) } }
}

/// `k/n`: the stage being pushed, soaked or judged, of how many.
fn stage_text(r: &Rollout) -> String {
    format!("{}/{}", r.stage + 1, r.stages.len())
}

fn target_text(r: &Rollout) -> Markup {
    html! {
        @if let Some(g) = &r.group { "group " strong.group { (g) } br; }
        @match &r.target {
            Target::All => span.muted { "every agent" },
            Target::Agent(uid) => a href={"/ui/agents/" (uid.to_string())} { (uid.to_string()) },
            Target::Labels(l) => @for (k, v) in l { span.label { (k) "=" (v) } },
        }
    }
}

async fn new_rollout_form(c: &Coordinator, who: &Signed) -> Markup {
    let mut versions = c.store().list_configs().await.unwrap_or_default();
    versions.reverse();
    let groups = c.groups_counted().await.unwrap_or_default();
    html! {
        h2 { "New rollout" }
        p.muted {
            "Of a config version, below. An upgrade to an imported build is staged the same way "
            "from the CLI or the API: " code { "ampora rollout create --package NAME --version V" } "."
        }
        @if versions.is_empty() {
            p.muted { "Create a config version first." }
        } @else {
            form.stacked #new-rollout method="post" action="/ui/rollouts" {
                (csrf(who))
                label for="config_id" { "Config version" }
                select #config_id name="config_id" {
                    @for v in &versions { option value=(v.id) { (v.id) " · " (v.name) } }
                }
                label for="target" { "To" }
                select #target name="target" {
                    option value="group" selected[!groups.is_empty()] { "a group" }
                    option value="labels" selected[groups.is_empty()] { "agents matching labels" }
                    option value="all" { "every agent" }
                }
                label for="group" { "Group" }
                select #group name="group" {
                    @for (g, n) in &groups { option value=(g.name) { (g.name) " (" (n) " agents)" } }
                }
                label for="labels" { "Or labels (key=value,…)" }
                input #labels type="text" name="labels" placeholder="env=prod,region=eu";
                label for="stages" { "Stages (cumulative counts and percentages, the last 100%)" }
                input #stages type="text" name="stages" value="1,5%,25%,100%" required;
                label for="soak" { "Soak per stage (e.g. 0s, 90s, 5m)" }
                input #soak type="text" name="soak" value="60s" required;
                label for="deadline" { "Deadline for a stage's agents to answer" }
                input #deadline type="text" name="deadline" value="10m" required;
                label for="budget" { "Failures allowed per stage (a count or a percentage)" }
                input #budget type="text" name="budget" value="0" required;
                label for="on_failure" { "When a gate fails" }
                select #on_failure name="on_failure" {
                    option value="pause" { "stop and wait for an operator" }
                    option value="rollback" { "roll back" }
                }
                button type="submit" data-confirm="Start this rollout?" { "Create rollout" }
            }
        }
    }
}

#[derive(Deserialize)]
pub(super) struct NewRolloutForm {
    config_id: i64,
    target: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    labels: String,
    #[serde(default)]
    stages: String,
    #[serde(default)]
    soak: String,
    #[serde(default)]
    deadline: String,
    #[serde(default)]
    budget: String,
    #[serde(default)]
    on_failure: String,
}

pub(super) async fn create(
    State(c): State<Arc<Coordinator>>,
    posted: Posted<Operator, NewRolloutForm>,
) -> Response {
    let who = posted.who.any();
    let f = posted.form;
    let bad = |text: String| view::error_page(Some(&who), &ApiError::BadRequest(text));
    let given = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
    let mut body = NewRolloutBody {
        config_id: Some(f.config_id),
        package: None,
        version: None,
        group: None,
        labels: None,
        all: false,
        stages: given(&f.stages),
        soak: given(&f.soak),
        deadline: given(&f.deadline),
        budget: given(&f.budget),
        on_failure: given(&f.on_failure),
        allow_downgrade: false,
        force: false,
    };
    match f.target.as_str() {
        "group" => body.group = Some(f.group),
        "labels" => match view::parse_labels(&f.labels) {
            Some(l) => body.labels = Some(l),
            None => return bad(format!("labels `{}` are not key=value,…", f.labels)),
        },
        "all" => body.all = true,
        other => return bad(format!("unknown target `{other}`")),
    }
    let plan = match plan(&c, body).await {
        Ok(p) => p,
        Err(e) => return view::error_page(Some(&who), &e),
    };
    match c.create_rollout(plan, &who.actor).await {
        Ok(r) => Redirect::to(&format!("/ui/rollouts/{}", r.id)).into_response(),
        Err(e) => view::error_page(Some(&who), &e.into()),
    }
}

/// A rollout's status, history and version name, or the page saying why not.
async fn gather(
    c: &Coordinator,
    who: &Signed,
    id: i64,
) -> Result<(RolloutStatus, Vec<RolloutEvent>, Option<String>), Response> {
    let status = c.rollout_status(id).await.map_err(|e| match e {
        crate::service::ServiceError::NotFound(_) => {
            view::status_page(StatusCode::NOT_FOUND, Some(who), "no such rollout")
        }
        e => view::error_page(Some(who), &e.into()),
    })?;
    let events = c
        .store()
        .rollout_events(id)
        .await
        .map_err(|e| view::error_page(Some(who), &e.into()))?;
    let name = match status.rollout.package {
        Some(_) => None,
        None => c
            .store()
            .get_config(status.rollout.config_id)
            .await
            .ok()
            .flatten()
            .map(|v| v.name),
    };
    Ok((status, events, name))
}

pub(super) async fn show(
    State(c): State<Arc<Coordinator>>,
    who: Signed,
    Path(id): Path<i64>,
) -> Response {
    let (status, events, name) = match gather(&c, &who, id).await {
        Ok(g) => g,
        Err(page) => return page,
    };
    let body = html! {
        h1 { "Rollout #" (id) }
        div #rollout-live data-poll={"/ui/rollouts/" (id) "/live"} {
            (live(&who, &status, &events, name.as_deref()))
        }
        p { a href="/ui/rollouts" { "All rollouts" } }
    };
    view::page(&format!("Rollout {id}"), Some(&who), body).into_response()
}

/// The live part alone, fetched again by the page while the rollout can still change.
pub(super) async fn fragment(
    State(c): State<Arc<Coordinator>>,
    who: Signed,
    Path(id): Path<i64>,
) -> Response {
    match gather(&c, &who, id).await {
        Ok((status, events, name)) => live(&who, &status, &events, name.as_deref()).into_response(),
        Err(page) => page,
    }
}

/// The actions a rollout's state allows (as `Coordinator::rollout_action` decides).
fn allowed(r: &Rollout) -> Vec<(Action, &'static str, Option<&'static str>)> {
    use RolloutState as S;
    let started = r
        .stages
        .get(r.stage)
        .is_some_and(|s| s.started_ms.is_some());
    let mut out = Vec::new();
    if matches!(r.state, S::Pending | S::Running) {
        out.push((Action::Pause, "Pause", None));
    }
    if matches!(r.state, S::Paused | S::Failed) {
        out.push((Action::Resume, "Resume", None));
    }
    if started && matches!(r.state, S::Running | S::Paused | S::Failed) {
        out.push((
            Action::Promote,
            "Promote",
            Some("Start the next stage now, without waiting for the soak or the gate?"),
        ));
    }
    if matches!(r.state, S::Pending | S::Running | S::Paused | S::Failed) {
        out.push((
            Action::Abort,
            "Abort",
            Some("Abort? Agents already changed keep this version."),
        ));
    }
    if matches!(r.state, S::Running | S::Paused | S::Failed | S::Aborted) {
        out.push((
            Action::Rollback,
            "Roll back",
            Some("Return every agent this rollout changed to the version it had?"),
        ));
    }
    out
}

fn live(who: &Signed, st: &RolloutStatus, events: &[RolloutEvent], name: Option<&str>) -> Markup {
    let r = &st.rollout;
    html! {
        // No final marker while the rollout can still change: the page keeps polling.
        div.rollout-summary data-final=[(!r.state.is_active()).then_some("true")] {
            dl.summary {
                dt { "State" } dd #rollout-state { (state_chip(r.state)) }
                @if let Some(reason) = &r.reason {
                    dt { "Reason" } dd #rollout-reason { (reason) }
                }
                @if let Some(p) = &r.package {
                    dt { "Upgrade to" } dd #rollout-package { (package_text(p)) }
                } @else {
                    dt { "Config" } dd {
                        a href={"/ui/configs/" (r.config_id)} { "version " (r.config_id) }
                        @if let Some(n) = name { " · " (n) }
                        " " code { (r.config_hash.get(..12).unwrap_or(&r.config_hash)) }
                    }
                }
                dt { "Target" } dd { (target_text(r)) }
                dt { "Stage" } dd #rollout-stage { (stage_text(r)) }
                dt { "Budget" } dd { (r.budget.to_string()) " per stage" }
                dt { "Deadline" } dd { (duration(r.deadline_ms)) " to answer" }
                dt { "On failure" } dd { (match r.on_failure { OnFailure::Pause => "stop", OnFailure::Rollback => "roll back" }) }
                dt { "Created" } dd { (when(Some(r.created_ms))) " by " (r.author) }
                dt { "Updated" } dd { (when(Some(r.updated_ms))) }
            }
            @if who.may(Role::Operator) {
                div.actions #rollout-actions {
                    @for (action, label, confirm) in allowed(r) {
                        form.inline method="post" action={"/ui/rollouts/" (r.id) "/" (action.as_str())} {
                            (csrf(who))
                            button type="submit" class={"act-" (action.as_str())} data-confirm=[confirm] { (label) }
                        }
                    }
                }
            }
            (unable(st))
            h2 { "Stages" }
            table #stages {
                thead { tr {
                    th { "#" } th { "Size" } th { "Planned" } th { "Progress" } th { "Started" }
                    th { "Settled" } th { "Soak" } th { "Gate" }
                } }
                tbody {
                    @for (i, s) in st.stages.iter().enumerate() { (stage_row(r, i, s)) }
                }
            }
            @for (i, s) in st.stages.iter().enumerate() {
                @if let Some(g) = s.gate.as_ref().filter(|g| !g.passed || !g.failures.is_empty()) {
                    (gate_detail(i, g))
                }
            }
            h2 { "History" }
            table #history {
                thead { tr { th { "When" } th { "Event" } th { "Stage" } th { "Who" } th { "Detail" } } }
                tbody {
                    @for e in events.iter().rev().take(HISTORY) {
                        tr {
                            td { (when(Some(e.at_ms))) }
                            td { (e.kind) }
                            td { @if let Some(s) = e.stage { (s + 1) } @else { "-" } }
                            td { (e.actor) }
                            td { @if !e.detail.is_null() { code { (e.detail.to_string()) } } }
                        }
                    }
                }
            }
        }
    }
}

/// The agents the rollout cannot reach or cannot judge: counted, never passed silently.
fn unable(st: &RolloutStatus) -> Markup {
    let upgrade = st.rollout.package.is_some();
    let why_not = if upgrade {
        " (no AcceptsPackages, or no build for their platform): left out. "
    } else {
        " (no AcceptsRemoteConfig): left out. "
    };
    html! {
        div #rollout-unable {
            @if st.cannot_receive > 0 {
                p.warning {
                    strong { (st.cannot_receive) " cannot receive" }
                    (why_not)
                    @for uid in st.cannot_receive_sample.iter().take(10) {
                        a.uid href={"/ui/agents/" (uid.to_string())} { (uid.to_string()) } " "
                    }
                }
            }
            @if st.health_unknown > 0 {
                p.warning { strong { (st.health_unknown) " cannot be judged on health" } " (no ReportsHealth)." }
            }
            @if st.effective_unknown > 0 {
                p.warning { strong { (st.effective_unknown) " cannot be judged on effective config" } " (no ReportsEffectiveConfig)." }
            }
            @if st.cannot_receive + st.health_unknown + st.effective_unknown == 0 {
                @if upgrade {
                    p.muted { "Every member can take the build and be judged on health." }
                } @else {
                    p.muted { "Every member can receive the config and be judged on health and effective config." }
                }
            }
        }
    }
}

fn stage_row(r: &Rollout, i: usize, s: &StageStatus) -> Markup {
    let p = &s.progress;
    let current = i == r.stage && r.state.is_active();
    html! {
        tr class={ "stage" @if current { " current" } } data-stage=(i + 1) {
            td { (i + 1) }
            td { (s.size) }
            td { (s.planned) }
            td.progress {
                @if s.started_ms.is_some() {
                    progress value=(p.applied) max=(p.members.max(1)) {}
                    " " span.ok-text { (p.applied) " applied" }
                    @if p.failed > 0 { " · " span.error { (p.failed) " failed" } }
                    " · " (p.waiting) " waiting"
                    " of " (p.members)
                } @else {
                    span.muted { "not started · " (p.members) " members" }
                }
            }
            td { (when(s.started_ms)) }
            td { (when(s.settled_ms)) }
            td {
                (duration(s.soak_ms))
                @if let Some(settled) = s.settled_ms {
                    br; small.muted { "until " (when(Some(settled + s.soak_ms))) }
                }
            }
            td {
                @match &s.gate {
                    Some(g) if g.passed => span.chip.gate-passed { "passed" },
                    Some(_) => span.chip.gate-failed { "failed" },
                    None => span.muted { "-" },
                }
            }
        }
    }
}

/// A gate's verdict in full: its reasons and the first failing agents, linked.
fn gate_detail(i: usize, g: &GateResult) -> Markup {
    html! {
        section.gate id={"gate-" (i + 1)} {
            h3 {
                "Stage " (i + 1) " gate: "
                @if g.passed { span.chip.gate-passed { "passed" } } @else { span.chip.gate-failed { "failed" } }
                " " small.muted { (when(Some(g.at_ms))) }
            }
            p.muted {
                (g.members) " judged · " (g.applied) " applied · " (g.failed) " failed · "
                (g.stragglers) " late · " (g.disconnected) " disconnected · " (g.unhealthy) " unhealthy · "
                (g.mismatched) " mismatched · budget " (g.budget)
            }
            @if !g.reasons.is_empty() {
                ul.reasons { @for reason in &g.reasons { li { (reason) } } }
            }
            @if !g.failures.is_empty() {
                table.failures {
                    thead { tr { th { "Agent" } th { "Why" } th { "What it said" } } }
                    tbody {
                        @for f in &g.failures {
                            tr {
                                td { a.failing-agent href={"/ui/agents/" (f.instance_uid.to_string())} { (f.instance_uid.to_string()) } }
                                td { (f.reason) }
                                td.error { (f.message) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn duration(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

pub(super) async fn act(
    State(c): State<Arc<Coordinator>>,
    Path((id, action)): Path<(i64, String)>,
    posted: Posted<Operator, Nothing>,
) -> Response {
    match act_on(&c, &posted.who.actor, id, &action).await {
        Ok(_) => Redirect::to(&format!("/ui/rollouts/{id}")).into_response(),
        Err(e) => view::error_page(Some(&posted.who.any()), &e),
    }
}

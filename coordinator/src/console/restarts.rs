//! Restarts in the console: the agent page's Restart button (for agents that declare
//! AcceptsRestartCommand), and the Restarts page, which restarts a group or the fleet in
//! batches and shows the newest restarts with their members (the failed and restarting first,
//! at most [`MEMBER_ROWS`] of them: a fleet restart can hold every agent). The writes call
//! what `POST /api/v1/agents/{uid}/restart` and `POST /api/v1/restarts` call, as operator.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use proto::agent_caps::ACCEPTS_RESTART_COMMAND;
use serde::Deserialize;
use shared::domain::{AgentRecord, Role, Target};
use shared::ids::InstanceUid;

use super::session::{Nothing, Posted, Signed};
use super::view::{self, csrf, when};
use crate::api::guard::Operator;
use crate::api::ApiError;
use crate::service::restarts::{MemberState, RestartJob, RestartMember, RestartPlan};
use crate::service::Coordinator;

/// The agent page's Restart section.
pub(super) fn section(who: &Signed, agent: &AgentRecord) -> Markup {
    if agent.capabilities & ACCEPTS_RESTART_COMMAND == 0 {
        return html! { p.muted #restart { "Cannot be restarted: the agent does not declare AcceptsRestartCommand." } };
    }
    let uid = agent.instance_uid.to_string();
    html! {
        div #restart {
            @if who.may(Role::Operator) {
                form.inline method="post" action={"/ui/agents/" (uid) "/restart"} {
                    (csrf(who))
                    button type="submit" data-confirm="Send this agent the restart command?" { "Restart" }
                }
            } @else {
                p.muted { "Operators can restart this agent." }
            }
        }
    }
}

pub(super) async fn restart_agent(
    State(c): State<Arc<Coordinator>>,
    Path(uid): Path<String>,
    posted: Posted<Operator, Nothing>,
) -> Response {
    let who = posted.who.any();
    let Ok(uid) = uid.parse::<InstanceUid>() else {
        return super::agent::not_a_uid(&who);
    };
    match c.restart_agent(uid, &who.actor).await {
        Ok(()) => Redirect::to(&format!("/ui/agents/{uid}")).into_response(),
        Err(e) => view::error_page(Some(&who), &e.into()),
    }
}

#[derive(Deserialize)]
pub(super) struct PageQuery {
    /// A group to preselect (the Groups page's Restart… link).
    #[serde(default)]
    group: String,
}

pub(super) async fn page(
    State(c): State<Arc<Coordinator>>,
    who: Signed,
    Query(q): Query<PageQuery>,
) -> Response {
    let groups = match c.groups_counted().await {
        Ok(g) => g,
        Err(e) => return view::error_page(Some(&who), &e.into()),
    };
    let jobs = match c.restart_jobs(SHOWN).await {
        Ok(j) => j,
        Err(e) => return view::error_page(Some(&who), &e.into()),
    };
    let body = html! {
        h1 { "Restarts" }
        p.muted {
            "Agents that declare AcceptsRestartCommand restart in batches; each must come back "
            "connected and healthy within the deadline, and the restart stops when more than the "
            "budget do not. A restart goes on if the coordinator driving it stops."
        }
        @if who.may(Role::Operator) {
            form #new-restart method="post" action="/ui/restarts" {
                (csrf(&who))
                label { "Group " select name="group" {
                    option value="" { "(every agent)" }
                    @for (g, n) in &groups {
                        option value=(g.name) selected[g.name == q.group] { (g.name) " (" (n) ")" }
                    }
                } }
                label { "Batch " input type="number" name="batch" value="10" min="1"; }
                label { "Deadline " input type="text" name="deadline" value="2m"; }
                label { "Budget " input type="number" name="budget" value="0" min="0"; }
                button type="submit" data-confirm="Restart these agents?" { "Restart" }
            }
        }
        @if jobs.is_empty() {
            p.muted { "No restart yet." }
        }
        @for j in &jobs {
            section.restart id={"restart-" (j.id)} {
                h2 { "Restart " (j.id) " " span class={"chip restart-" (j.state.as_str())} { (j.state.as_str()) } }
                p.muted {
                    (when(Some(j.created_ms))) " by " (j.author) " · batches of " (j.batch)
                    " · deadline " (j.deadline_ms / 1000) " s · budget " (j.budget)
                    @if !j.unable.is_empty() { " · " (j.unable.len()) " cannot restart" }
                }
                @if let Some(r) = &j.reason { p.error { (r) } }
                p.counts { (counts(j)) }
                table.members {
                    thead { tr { th { "Agent" } th { "State" } th { "Reason" } } }
                    tbody {
                        @for m in first_rows(j) {
                            tr {
                                td { a href={"/ui/agents/" (m.uid)} { code { (m.uid) } } }
                                td { span class={"chip restart-" (m.state.as_str())} { (m.state.as_str().replace('_', " ")) } }
                                td { (m.reason.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
                @if j.members.len() > MEMBER_ROWS {
                    p.muted {
                        "… and " (j.members.len() - MEMBER_ROWS) " more; "
                        code { "GET /api/v1/restarts/" (j.id) } " lists every member."
                    }
                }
            }
        }
    };
    view::page("Restarts", Some(&who), body).into_response()
}

/// Restarts shown on the page, newest first.
const SHOWN: u32 = 10;
/// Member rows shown per restart.
const MEMBER_ROWS: usize = 100;

/// "3 restarted · 1 failed · …": the members by state, in the order a restart moves them.
fn counts(j: &RestartJob) -> String {
    use MemberState::*;
    [Restarted, Restarting, Failed, Waiting, NotSent]
        .into_iter()
        .filter_map(|state| {
            let n = j.members.iter().filter(|m| m.state == state).count();
            (n > 0).then(|| format!("{n} {}", state.as_str().replace('_', " ")))
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

/// The members worth a look first (failed, then restarting), then the rest in order.
fn first_rows(j: &RestartJob) -> impl Iterator<Item = &RestartMember> {
    let rank = |m: &&RestartMember| match m.state {
        MemberState::Failed => 0,
        MemberState::Restarting => 1,
        _ => 2,
    };
    let mut rows: Vec<&RestartMember> = j.members.iter().collect();
    rows.sort_by_key(rank);
    rows.into_iter().take(MEMBER_ROWS)
}

#[derive(Deserialize)]
pub(super) struct RestartForm {
    #[serde(default)]
    group: String,
    batch: usize,
    deadline: String,
    budget: u64,
}

pub(super) async fn start(
    State(c): State<Arc<Coordinator>>,
    posted: Posted<Operator, RestartForm>,
) -> Response {
    let Posted { who, form } = posted;
    let who = who.any();
    let target = if form.group.is_empty() {
        Target::All
    } else {
        match c.group(&form.group).await {
            Ok(g) => g.target(),
            Err(e) => return view::error_page(Some(&who), &e.into()),
        }
    };
    let deadline: Duration = match humantime::parse_duration(form.deadline.trim()) {
        Ok(d) => d,
        Err(e) => {
            let e = ApiError::BadRequest(format!("deadline `{}`: {e}", form.deadline));
            return view::error_page(Some(&who), &e);
        }
    };
    let plan = RestartPlan {
        target,
        batch: form.batch,
        deadline_ms: i64::try_from(deadline.as_millis()).unwrap_or(i64::MAX),
        budget: form.budget,
    };
    match c.start_restart(plan, &who.actor).await {
        Ok(job) => Redirect::to(&format!("/ui/restarts#restart-{}", job.id)).into_response(),
        Err(e) => view::error_page(Some(&who), &e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::restarts::JobState;

    #[test]
    fn a_fleet_restart_shows_its_counts_and_the_failed_first_within_the_cap() {
        let member = |i: usize| RestartMember {
            uid: format!("agent-{i}"),
            state: match i {
                0..=149 => MemberState::Restarted,
                150 => MemberState::Restarting,
                151 | 152 => MemberState::Waiting,
                _ => MemberState::Failed,
            },
            sent_ms: None,
            reason: None,
            sent_epoch: None,
        };
        let job = RestartJob {
            id: 1,
            rev: 1,
            state: JobState::Running,
            reason: None,
            author: "api:test".into(),
            created_ms: 0,
            finished_ms: None,
            batch: 10,
            deadline_ms: 1_000,
            budget: 5,
            members: (0..154).map(member).collect(),
            unable: Vec::new(),
        };
        assert_eq!(
            counts(&job),
            "150 restarted · 1 restarting · 1 failed · 2 waiting"
        );
        let rows: Vec<&str> = first_rows(&job).map(|m| m.uid.as_str()).collect();
        assert_eq!(rows.len(), MEMBER_ROWS);
        assert_eq!(&rows[..3], ["agent-153", "agent-150", "agent-0"]);
    }
}

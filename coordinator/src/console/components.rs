//! The agent page's Components section: the component types the agent's build has, by kind,
//! as it reported them (every value is agent-reported, so escaped by the template).

use maud::{html, Markup};
use proto::agent_caps::REPORTS_AVAILABLE_COMPONENTS;
use shared::domain::AgentRecord;

use crate::service::Coordinator;

pub(super) fn section(c: &Coordinator, agent: &AgentRecord) -> Markup {
    if agent.capabilities & REPORTS_AVAILABLE_COMPONENTS == 0 {
        return html! { p.muted #components { "Not reported: the agent does not declare ReportsAvailableComponents." } };
    }
    let Some(set) = c.components_of(agent) else {
        return html! { p.muted #components { "Reported by hash; the set has not been received yet." } };
    };
    html! {
        div #components {
            p.muted {
                "Build " code { (agent.components_hash.as_deref().unwrap_or("").get(..12).unwrap_or("")) }
                ": configs using a component missing here are refused for this agent before they are sent."
            }
            table {
                thead { tr { th { "Kind" } th { "Components" } } }
                tbody {
                    @for (kind, types) in set.iter() {
                        tr {
                            td { (kind) }
                            td {
                                @for (i, t) in types.iter().enumerate() {
                                    @if i > 0 { ", " }
                                    code { (t) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

//! Agents: record round-trips, upserts, bulk batches and loading by partition.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use shared::domain::{AgentRecord, Health, RemoteConfigReport, RemoteStatus, Transport};
use shared::ids::InstanceUid;
use shared::store::Store;

use super::file;

/// An agent with every field set to a non-default value.
fn full_agent(uid: InstanceUid) -> AgentRecord {
    let mut a = AgentRecord::new(uid, 1_700_000_000_123);
    a.description
        .identifying
        .insert("service.name".into(), json!("otelcol-contrib"));
    a.description
        .identifying
        .insert("service.instance.id".into(), json!(uid.to_string()));
    a.description
        .non_identifying
        .insert("host.name".into(), json!("node-1.example"));
    a.description
        .non_identifying
        .insert("cpu.count".into(), json!(64));
    a.description
        .non_identifying
        .insert("load".into(), json!(1.5));
    a.description
        .non_identifying
        .insert("canary".into(), json!(true));
    a.description.non_identifying.insert(
        "nested".into(),
        json!({"list": [1, "two", null, {"x": -3}], "unicode": "ünï ✓"}),
    );
    // Agents report arbitrary strings; a NUL must neither fail the write nor get lost.
    a.description
        .non_identifying
        .insert("nul".into(), json!("before\u{0}after"));
    a.capabilities = u64::MAX;
    a.health = Some(Health {
        healthy: false,
        status: "StatusRecoverableError".into(),
        last_error: "exporter failing".into(),
        start_time_unix_nano: 1_700_000_000_000_000_001,
        status_time_unix_nano: u64::MAX,
        components: BTreeMap::from([
            (
                "pipeline:traces".into(),
                Health {
                    healthy: false,
                    status: "StatusRecoverableError".into(),
                    last_error: "otlp exporter: connection refused".into(),
                    start_time_unix_nano: 5,
                    status_time_unix_nano: 6,
                    components: BTreeMap::from([(
                        "exporter:otlp".into(),
                        Health {
                            healthy: false,
                            status: "StatusRecoverableError".into(),
                            last_error: "connection refused".into(),
                            start_time_unix_nano: 7,
                            status_time_unix_nano: 8,
                            components: BTreeMap::new(),
                        },
                    )]),
                },
            ),
            (
                "pipeline:metrics".into(),
                Health {
                    healthy: true,
                    status: "StatusOK".into(),
                    ..Health::default()
                },
            ),
        ]),
    });
    a.effective_config = Some(BTreeMap::from([
        (String::new(), file("receivers:\n  otlp: {}\n", "text/yaml")),
        (
            "extra.json".into(),
            file("{\"a\": \"b\\n\"}", "application/json"),
        ),
    ]));
    a.effective_config_hash = Some("e1".repeat(32));
    a.remote_config = Some(RemoteConfigReport {
        hash: "c0ffee".into(),
        status: RemoteStatus::Failed,
        error_message: "invalid key 'foo'".into(),
    });
    a.assigned_config = Some(42);
    a.assigned_config_hash = Some("c0ffee".into());
    a.applied_effective_hash = Some("e0".repeat(32));
    a.connected = true;
    a.transport = Some(Transport::WebSocket);
    a.gateway = Some("gw-7f3a".into());
    a.sequence_num = u64::MAX - 1;
    a.last_seen_ms = 1_700_000_999_999;
    a
}

/// Every field of an agent record survives `upsert_agents` → `get_agent` / `load_agents`.
pub async fn agents_round_trip(store: &dyn Store) {
    let full = full_agent(InstanceUid::new_v7());
    let minimal = AgentRecord::new(InstanceUid::new_v7(), -5);
    assert_eq!(
        store.get_agent(full.instance_uid).await.expect("get_agent"),
        None,
        "unknown agent"
    );
    store.upsert_agents(&[]).await.expect("empty upsert");
    store
        .upsert_agents(&[full.clone(), minimal.clone()])
        .await
        .expect("upsert_agents");
    assert_eq!(
        store.get_agent(full.instance_uid).await.expect("get_agent"),
        Some(full.clone())
    );
    assert_eq!(
        store
            .get_agent(minimal.instance_uid)
            .await
            .expect("get_agent"),
        Some(minimal.clone())
    );
    let all = store.load_agents().await.expect("load_agents");
    for want in [&full, &minimal] {
        let found: Vec<_> = all
            .iter()
            .filter(|a| a.instance_uid == want.instance_uid)
            .collect();
        assert_eq!(
            found,
            vec![&want.without_effective_config()],
            "load_agents returns each agent once, intact but for its effective config files"
        );
    }
}

/// Effective config files are stored once and read one agent at a time: a write without
/// them keeps the stored ones, a write with other files replaces them, and loading many
/// agents brings only the hash.
pub async fn agents_effective_config_files(store: &dyn Store) {
    let uid = InstanceUid::new_v7();
    let mut a = AgentRecord::new(uid, 1);
    a.effective_config = Some(BTreeMap::from([(
        "c.yaml".into(),
        file("a: 1", "text/yaml"),
    )]));
    a.effective_config_hash = Some("11".repeat(32));
    store.upsert_agents(&[a.clone()]).await.expect("upsert");

    let mut later = a.without_effective_config();
    later.last_seen_ms = 2;
    store.upsert_agents(&[later.clone()]).await.expect("upsert");
    let got = store.get_agent(uid).await.expect("get").expect("agent");
    assert_eq!(got.last_seen_ms, 2, "the record was replaced");
    assert_eq!(
        got.effective_config, a.effective_config,
        "a record without files keeps the stored ones"
    );
    let loaded = store
        .load_agents_in(&[uid.partition()])
        .await
        .expect("load");
    let mine: Vec<_> = loaded.iter().filter(|r| r.instance_uid == uid).collect();
    assert_eq!(mine, vec![&later], "loads carry the hash, not the files");

    let mut changed = later.clone();
    changed.effective_config = Some(BTreeMap::from([(
        "c.yaml".into(),
        file("b: 2", "text/yaml"),
    )]));
    changed.effective_config_hash = Some("22".repeat(32));
    store
        .upsert_agents(&[changed.clone()])
        .await
        .expect("upsert");
    assert_eq!(
        store.get_agent(uid).await.expect("get"),
        Some(changed),
        "other files replace the stored ones"
    );
}

/// An own-metrics window's points are stored beside the record: one agent read, or the
/// agents of a partition taken over, bring them; a load of every agent brings the rates only.
pub async fn agents_throughput_window(store: &dyn Store) {
    use shared::own_telemetry::{Figures, Throughput};
    let uid = InstanceUid::new_v7();
    let mut a = AgentRecord::new(uid, 1);
    let mut t = Throughput::default();
    let mut f = Figures::default();
    f.present[0] = true;
    for (m, total) in [(100i64, 10.0), (101, 70.0), (102, 190.0)] {
        f.cumulative[0] = total;
        t.record(&f, m * 60_000);
    }
    assert_eq!(t.points.len(), 3);
    a.throughput = Some(Box::new(t));
    store.upsert_agents(&[a.clone()]).await.expect("upsert");
    assert_eq!(store.get_agent(uid).await.expect("get").as_ref(), Some(&a));
    let taken: Vec<_> = store
        .load_agents_in(&[uid.partition()])
        .await
        .expect("load")
        .into_iter()
        .filter(|r| r.instance_uid == uid)
        .collect();
    assert_eq!(taken, vec![a.clone()], "a take-over keeps the window");
    let all = store.load_agents().await.expect("load all");
    let light = all.iter().find(|r| r.instance_uid == uid).expect("listed");
    let t = light.throughput.as_deref().expect("the rates");
    assert!(t.points.is_empty(), "no points in a load of every agent");
    assert_eq!(
        t.rates,
        a.throughput.as_deref().map(|t| t.rates).unwrap_or_default()
    );
}

/// Upserting an existing agent replaces its record instead of adding one.
pub async fn agents_upsert_updates(store: &dyn Store) {
    let uid = InstanceUid::new_v7();
    let first = full_agent(uid);
    store
        .upsert_agents(std::slice::from_ref(&first))
        .await
        .expect("upsert");

    let mut second = first.clone();
    second.connected = false;
    second.transport = Some(Transport::Http);
    second.gateway = None;
    second.health = None;
    second.remote_config = None;
    second.effective_config = Some(BTreeMap::new());
    second
        .description
        .non_identifying
        .insert("host.name".into(), json!("node-2.example"));
    second.description.identifying.remove("service.instance.id");
    second.sequence_num = 3;
    second.last_seen_ms = first.last_seen_ms + 1_000;
    store
        .upsert_agents(std::slice::from_ref(&second))
        .await
        .expect("upsert again");
    assert_eq!(
        store.get_agent(uid).await.expect("get_agent"),
        Some(second.clone())
    );

    // The same uid twice in one batch: the later record wins.
    let mut third = second.clone();
    third.sequence_num = 4;
    let mut fourth = second.clone();
    fourth.sequence_num = 5;
    fourth.connected = true;
    store
        .upsert_agents(&[third, fourth.clone()])
        .await
        .expect("upsert duplicate batch");
    assert_eq!(
        store.get_agent(uid).await.expect("get_agent"),
        Some(fourth.clone())
    );

    let all = store.load_agents().await.expect("load_agents");
    let found: Vec<_> = all.iter().filter(|a| a.instance_uid == uid).collect();
    assert_eq!(
        found,
        vec![&fourth.without_effective_config()],
        "upserts must not duplicate agents"
    );
}

/// A batch larger than any plausible statement chunk round-trips completely.
pub async fn agents_bulk(store: &dyn Store) {
    let batch: Vec<AgentRecord> = (0..1_234)
        .map(|i| {
            let mut a = AgentRecord::new(InstanceUid::new_v7(), 1_000 + i);
            a.connected = i % 2 == 0;
            a.sequence_num = i as u64;
            a.description.identifying.insert("i".into(), json!(i));
            a
        })
        .collect();
    store.upsert_agents(&batch).await.expect("bulk upsert");
    let all = store.load_agents().await.expect("load_agents");
    let by_uid: BTreeMap<InstanceUid, &AgentRecord> =
        all.iter().map(|a| (a.instance_uid, a)).collect();
    for a in &batch {
        assert_eq!(
            by_uid.get(&a.instance_uid),
            Some(&a),
            "bulk agent round trip"
        );
    }
    let probe = &batch[batch.len() / 2];
    assert_eq!(
        store
            .get_agent(probe.instance_uid)
            .await
            .expect("get_agent"),
        Some(probe.clone())
    );
}

/// `load_agents_in` returns exactly the agents of the named partitions, each once.
pub async fn agents_by_partition(store: &dyn Store) {
    let batch: Vec<AgentRecord> = (0..600)
        .map(|i| {
            let mut a = AgentRecord::new(InstanceUid::new_v7(), 2_000 + i);
            a.description.identifying.insert("i".into(), json!(i));
            a
        })
        .collect();
    store.upsert_agents(&batch).await.expect("upsert_agents");
    // A few partitions that certainly hold some of ours, named twice and out of order.
    let chosen: BTreeSet<u16> = batch
        .iter()
        .take(5)
        .map(|a| a.instance_uid.partition())
        .collect();
    // One more agent in a chosen partition, with an own-metrics window: a take-over brings
    // its points, which a load of every agent leaves out.
    let first = *chosen.first().expect("a partition");
    let windowed_uid = std::iter::repeat_with(InstanceUid::new_v7)
        .find(|u| u.partition() == first)
        .expect("a uid in the partition");
    let mut windowed = AgentRecord::new(windowed_uid, 2_600);
    let mut t = shared::own_telemetry::Throughput::default();
    let mut f = shared::own_telemetry::Figures::default();
    f.present[0] = true;
    for (m, total) in [(100i64, 10.0), (101, 70.0)] {
        f.cumulative[0] = total;
        t.record(&f, m * 60_000);
    }
    windowed.throughput = Some(Box::new(t));
    store
        .upsert_agents(std::slice::from_ref(&windowed))
        .await
        .expect("upsert the windowed agent");
    let mut asked: Vec<u16> = chosen.iter().rev().copied().collect();
    asked.extend(chosen.iter().copied());

    let got = store.load_agents_in(&asked).await.expect("load_agents_in");
    let got_by_uid: BTreeMap<InstanceUid, AgentRecord> =
        got.iter().map(|a| (a.instance_uid, a.clone())).collect();
    assert_eq!(got_by_uid.len(), got.len(), "each agent is returned once");
    let expected: BTreeMap<InstanceUid, AgentRecord> = store
        .load_agents()
        .await
        .expect("load_agents")
        .into_iter()
        .filter(|a| chosen.contains(&a.instance_uid.partition()))
        .map(|a| (a.instance_uid, a))
        .collect();
    // A load of every agent leaves out own-metrics points (another test may have stored an
    // agent with some in one of these partitions), so they are compared without them.
    let without_points = |mut a: AgentRecord| {
        if let Some(t) = a.throughput.as_deref_mut() {
            t.points.clear();
        }
        a
    };
    let got_light: BTreeMap<InstanceUid, AgentRecord> = got_by_uid
        .iter()
        .map(|(uid, a)| (*uid, without_points(a.clone())))
        .collect();
    assert_eq!(
        got_light, expected,
        "exactly the agents of those partitions"
    );
    assert_eq!(
        got_by_uid.get(&windowed_uid),
        Some(&windowed),
        "a take-over brings the window's points"
    );
    for a in &batch {
        let inside = chosen.contains(&a.instance_uid.partition());
        assert_eq!(
            got_by_uid.get(&a.instance_uid),
            inside.then_some(a),
            "agent in partition {}",
            a.instance_uid.partition()
        );
    }

    // An update keeps the agent in its partition.
    let mut moved = batch[0].clone();
    moved.connected = true;
    moved.last_seen_ms += 1;
    store
        .upsert_agents(std::slice::from_ref(&moved))
        .await
        .expect("upsert again");
    let again = store
        .load_agents_in(&[moved.instance_uid.partition()])
        .await
        .expect("load_agents_in");
    let found: Vec<_> = again
        .iter()
        .filter(|a| a.instance_uid == moved.instance_uid)
        .collect();
    assert_eq!(found, vec![&moved]);

    assert_eq!(
        store.load_agents_in(&[]).await.expect("load_agents_in"),
        Vec::<AgentRecord>::new(),
        "no partitions, no agents"
    );
}

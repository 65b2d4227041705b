//! Test support shared by every crate's tests: the one bounded poll and the one first message. Compiled for this crate's
//! own tests and, through the `test-support` feature, for the dev-dependencies of `gateway`,
//! `coordinator`, `loadtest` and the `tests` harness (which `gateway` and `shared` unit tests
//! cannot depend on: it depends on them).

use std::future::Future;
use std::time::Duration;

/// A first message of agent `uid` that reports status and nothing else (not even a
/// description): the smallest message a server must accept from a new agent.
pub fn first_message(uid: crate::ids::InstanceUid) -> proto::AgentToServer {
    proto::AgentToServer {
        instance_uid: uid.0.to_vec(),
        capabilities: 0x1,
        ..Default::default()
    }
}

/// Polls `check` every `pause` until it yields `Some`, for at most `within`; `None` if it never
/// did. Never a fixed sleep: the pause between polls is short and `within` bounds the whole
/// wait. Measured on the Tokio clock.
pub async fn poll<T, F, Fut>(within: Duration, pause: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
    }
}

/// [`poll`] for a condition that needs no `.await`: waits until `cond` holds, and panics with
/// `what` if it does not within `within`.
pub async fn eventually(
    what: &str,
    within: Duration,
    pause: Duration,
    mut cond: impl FnMut() -> bool,
) {
    let held = poll(within, pause, || std::future::ready(cond().then_some(()))).await;
    assert!(
        held.is_some(),
        "timed out after {within:?} waiting for {what}"
    );
}

/// [`poll`] for code outside a runtime (a test driving a child process): the same loop on the
/// thread's clock, sleeping the thread.
pub fn poll_blocking<T>(
    within: Duration,
    pause: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn poll_returns_the_first_value_and_gives_up_after_the_bound() {
        let mut n = 0;
        let got = poll(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            std::future::ready((n == 3).then_some(n))
        })
        .await;
        assert_eq!(got, Some(3));
        let start = std::time::Instant::now();
        let never: Option<()> = poll(Duration::from_millis(50), Duration::from_millis(5), || {
            std::future::ready(None)
        })
        .await;
        assert_eq!(never, None);
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn poll_blocking_gives_up_after_the_bound() {
        let mut n = 0;
        assert_eq!(
            poll_blocking(Duration::from_secs(5), Duration::from_millis(1), || {
                n += 1;
                (n == 2).then_some(n)
            }),
            Some(2)
        );
        let none: Option<()> =
            poll_blocking(Duration::from_millis(20), Duration::from_millis(5), || None);
        assert_eq!(none, None);
    }
}

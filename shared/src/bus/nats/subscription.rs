//! The task behind every subscription: [`spawn_subscription`] runs a handler per message and
//! [`Serving`] stops it cleanly (unsubscribe, then finish what was already received). Knows
//! nothing of what the messages mean, so coordinator, gateway and control subscriptions share it.

use async_nats::{Message, Subscriber};
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A subscription's task and the way to stop it cleanly (unsubscribe, then return).
pub(super) struct Serving {
    pub(super) stop: oneshot::Sender<()>,
    pub(super) task: JoinHandle<()>,
}

impl Serving {
    /// Unsubscribes and waits for the task to finish the message it is on.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        // The task only ends by itself or by this signal; a panic in it is already logged.
        let _ = self.task.await;
    }
}

/// Spawns the task of one subscription: `on_message` for each message until `on_message` says
/// stop, or until the subscription ends, or until stopped through [`Serving::stop`]. Then it
/// unsubscribes; when stopped, it still handles the messages the client had already received
/// (a partition handed over keeps the requests that reached this coordinator first).
pub(super) fn spawn_subscription<F, Fut>(mut sub: Subscriber, mut on_message: F) -> Serving
where
    F: FnMut(Message) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Flow> + Send,
{
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let drain = loop {
            tokio::select! {
                biased;
                _ = &mut stopped => break true,
                msg = sub.next() => match msg {
                    Some(msg) => {
                        if let Flow::Stop = on_message(msg).await {
                            break false;
                        }
                    }
                    None => return,
                },
            }
        };
        if let Err(e) = sub.unsubscribe().await {
            tracing::debug!(error = %e, "nats unsubscribe failed (connection closing)");
        }
        if drain {
            // `unsubscribe` closed the client's queue: this ends with what was already in it.
            while let Some(msg) = sub.next().await {
                if let Flow::Stop = on_message(msg).await {
                    break;
                }
            }
        }
    });
    Serving { stop, task }
}

/// Whether a subscription goes on after a message.
pub(super) enum Flow {
    Continue,
    Stop,
}

//! The [`Bus`] contract over NATS: each trait method in terms of the sending side, the
//! subscriptions and the shared state. Sits on top of every other part of the NATS bus.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::connection::NatsBus;
use super::state::{lock, unavailable};
use super::subscription::{spawn_subscription, Flow, Serving};
use super::telemetry::{count_dropped, count_received, count_sent, REQUESTS};
use crate::bus::wire;
use crate::bus::{
    Bus, BusError, ControlEvent, CoordinatorEvent, CoordinatorHandler, CoordinatorReply,
    CoordinatorRequest, GatewayMessage, Route, CONTROL_QUEUE, GATEWAY_QUEUE,
};
use crate::ids::GatewayId;

#[async_trait]
impl Bus for NatsBus {
    async fn request(
        &self,
        route: Route,
        req: CoordinatorRequest,
    ) -> Result<CoordinatorReply, BusError> {
        let inner = &self.inner;
        let body = wire::encode_request(req);
        let res = inner
            .send_to_coordinators(inner.subjects.route(route), body, true)
            .await
            .and_then(|reply| {
                let body = reply.unwrap_or_default();
                wire::decode_reply(&body).map_err(|e| {
                    count_dropped("malformed");
                    tracing::warn!(error = %e, "malformed bus reply dropped");
                    BusError::Unavailable(e.to_string())
                })
            });
        let outcome = match &res {
            Ok(_) => {
                count_received("reply");
                "ok"
            }
            Err(BusError::NoResponder) => "no_responder",
            Err(BusError::Timeout) => "timeout",
            Err(BusError::TooLarge { .. }) => "too_large",
            Err(BusError::Unavailable(_)) => "error",
        };
        if outcome != "too_large" {
            count_sent("request");
        }
        metrics::counter!(REQUESTS, "outcome" => outcome).increment(1);
        res
    }

    async fn notify(&self, route: Route, ev: CoordinatorEvent) -> Result<(), BusError> {
        let inner = &self.inner;
        let body = wire::encode_event(ev);
        inner
            .send_to_coordinators(inner.subjects.route(route), body, false)
            .await?;
        count_sent("event");
        Ok(())
    }

    async fn deliver(&self, gateway: &GatewayId, msg: GatewayMessage) -> Result<(), BusError> {
        let inner = &self.inner;
        let body = wire::encode_gateway(msg);
        inner
            .deliver_bodies(inner.subjects.gateway(gateway), vec![body])
            .await
    }

    /// All of them through the gateway's lane at once: coalesced into as few NATS messages as
    /// their size allows (one lock, one flusher), in order.
    async fn deliver_many(
        &self,
        gateway: &GatewayId,
        msgs: Vec<GatewayMessage>,
    ) -> Result<(), BusError> {
        let inner = &self.inner;
        let bodies = msgs.into_iter().map(wire::encode_gateway).collect();
        inner
            .deliver_bodies(inner.subjects.gateway(gateway), bodies)
            .await
    }

    async fn serve_coordinator(
        &self,
        handler: Arc<dyn CoordinatorHandler>,
    ) -> Result<(), BusError> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        *inner.handler.write().unwrap_or_else(|e| e.into_inner()) = Some(handler);
        if lock(&inner.any).is_none() {
            let serving = inner
                .serve_subject(inner.subjects.route(Route::Any))
                .await?;
            *lock(&inner.any) = Some(serving);
        }
        Ok(())
    }

    async fn serve_partitions(&self, partitions: &[u16]) -> Result<(), BusError> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        if inner.handler().is_none() {
            return Err(BusError::Unavailable(
                "serve_coordinator must be called before serve_partitions".into(),
            ));
        }
        for &p in partitions {
            if lock(&inner.partitions).contains_key(&p) {
                continue;
            }
            let serving = inner.serve_subject(inner.subjects.partition(p)).await?;
            lock(&inner.partitions).insert(p, serving);
        }
        Ok(())
    }

    async fn unserve_partitions(&self, partitions: &[u16]) -> Result<(), BusError> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        let stopping: Vec<Serving> = {
            let mut served = lock(&inner.partitions);
            partitions.iter().filter_map(|p| served.remove(p)).collect()
        };
        for serving in stopping {
            serving.stop().await;
        }
        // The server has processed the unsubscribes once this returns, so a request sent
        // after `unserve_partitions` no longer reaches this coordinator.
        inner.barrier().await
    }

    async fn broadcast(&self, ev: ControlEvent) -> Result<(), BusError> {
        let inner = &self.inner;
        let body = wire::encode_control(ev);
        inner.check_size(body.len())?;
        inner
            .publish_direct(inner.subjects.control(), Bytes::from(body))
            .await?;
        count_sent("control");
        Ok(())
    }

    async fn subscribe_control(&self) -> Result<mpsc::Receiver<ControlEvent>, BusError> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        if lock(&inner.control).is_none() {
            let sub = inner
                .client
                .subscribe(inner.subjects.control())
                .await
                .map_err(unavailable)?;
            inner.barrier().await?;
            let fanout = inner.clone();
            let serving = spawn_subscription(sub, move |msg| {
                let inner = fanout.clone();
                async move {
                    inner.on_control(&msg);
                    Flow::Continue
                }
            });
            *lock(&inner.control) = Some(serving);
        }
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        lock(&inner.control_subscribers).push(tx);
        Ok(rx)
    }

    async fn subscribe_gateway(
        &self,
        gateway: &GatewayId,
    ) -> Result<mpsc::Receiver<GatewayMessage>, BusError> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        // A gateway subscribes once; should it do so again, the newer receiver wins.
        let previous = lock(&inner.gateways).remove(gateway);
        if let Some(previous) = previous {
            previous.stop().await;
        }
        let sub = inner
            .client
            .subscribe(inner.subjects.gateway(gateway))
            .await
            .map_err(unavailable)?;
        inner.barrier().await?;
        let (tx, rx) = mpsc::channel(GATEWAY_QUEUE);
        let receiver = inner.clone();
        let serving = spawn_subscription(sub, move |msg| {
            let inner = receiver.clone();
            let tx = tx.clone();
            async move { inner.on_delivery(&msg, &tx) }
        });
        lock(&inner.gateways).insert(gateway.clone(), serving);
        Ok(rx)
    }

    fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }
}

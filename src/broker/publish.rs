//! Publishing to the broker with publisher confirms: reply events to the
//! reply exchange, and dead letters to the dead-letter exchange. The calls
//! here return only once the broker has confirmed the message, so what the
//! worker records as published really is. A job's non-terminal events go
//! through an [`EventLane`] instead (see `lane`): pipelined on one channel of
//! a small pool, confirmed in bounded batches.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::Mutex;

use crate::broker::announce::Announcer;
pub(crate) use crate::broker::attribution::{event_properties, event_props};
pub use crate::broker::attribution::{Attribution, LEASE_EPOCH_HEADER, WORKER_ID_HEADER};
use crate::broker::lane::{AmqpLane, ConfirmObserver, EventLane};
use crate::broker::{Topology, DEAD_LETTER_REASON_HEADER};
use crate::protocol::EventV1;

/// Every variant means the same to the caller: the message may not have
/// been delivered; keep the job in the database and try later.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused the message (a negative confirm).
    #[error("RabbitMQ refused a message to {exchange}")]
    Nacked { exchange: String },
    /// No confirm (or no recovered connection) within the publish timeout:
    /// a broker under a memory or disk alarm, or one that is gone.
    #[error("RabbitMQ did not confirm a publish within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    /// The connection is gone and did not recover.
    #[error("publish to RabbitMQ failed: {0}")]
    Broker(String),
    /// The event's lease was no longer held when its turn to go out came:
    /// not published.
    #[error("the session lease was lost before the event went out; not published")]
    Fenced,
}

/// Where reply events and dead letters go. The AMQP implementation is the
/// product; the trait lets a test observe or fail publishing.
#[async_trait::async_trait]
pub trait ReplySink: Send + Sync + 'static {
    /// Publishes one event (already serialised) to `routing_key`,
    /// attributed to the worker and lease it comes from: the AMQP
    /// implementation adds the `x-worker-id` and `x-lease-epoch` headers
    /// (the JSON body is unchanged). Every event is attributed; only a
    /// republished terminal event (`publish_raw_event`) is not.
    async fn publish_event(
        &self,
        routing_key: &str,
        event: &EventV1,
        body: &[u8],
        from: &Attribution<'_>,
    ) -> Result<(), PublishError>;
    /// Republishes a stored terminal event verbatim.
    async fn publish_raw_event(
        &self,
        routing_key: &str,
        job_id: &str,
        body: &[u8],
    ) -> Result<(), PublishError>;
    /// A lane for one job's non-terminal events (pipelined confirms), or
    /// None: the caller then publishes each with `publish_event`.
    /// `observe` is told each confirm's latency.
    fn event_lane(&self, _observe: Option<ConfirmObserver>) -> Option<Box<dyn EventLane>> {
        None
    }
    /// Publishes a session lifecycle event (already serialised) with its
    /// type as the routing key (`session.started`, …). Only the AMQP sink
    /// publishes these; a test sink refuses them.
    async fn publish_session_event(
        &self,
        kind: &str,
        event_id: i64,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let _ = (kind, event_id, body);
        Err(PublishError::Broker(
            "this sink does not publish session events".into(),
        ))
    }
    /// Publishes a control message's answer (already serialised).
    async fn publish_control_result(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
    ) -> Result<(), PublishError>;
    /// Publishes a control message to every worker.
    async fn publish_control(
        &self,
        body: &[u8],
        request_id: &str,
        reply_to: Option<&str>,
    ) -> Result<(), PublishError>;
    /// Tells the workers `routing_key` names (on the workers exchange)
    /// that a job was accepted: a hint, sent without a confirm, whose loss
    /// costs a lease holder one poll interval. A sink without a broker
    /// tells no one.
    async fn announce_accept(&self, _routing_key: &str, _body: &[u8]) -> Result<(), PublishError> {
        Ok(())
    }
    /// Dead-letters a job body with the reason in a header.
    async fn dead_letter(
        &self,
        original: &lapin::message::Delivery,
        reason: &str,
    ) -> Result<(), PublishError>;
}

pub struct AmqpSink {
    /// Confirmed one at a time: terminal events, control messages and
    /// results, dead letters.
    channel: Channel,
    /// Event lanes, one channel each, taken in turn: sessions do not queue
    /// behind one another's confirms.
    lanes: Vec<Channel>,
    next_lane: std::sync::atomic::AtomicUsize,
    /// Unconfirmed events a lane may have before it waits.
    max_in_flight: usize,
    topology: Topology,
    /// Confirms are awaited one at a time per publish; serialising the
    /// publish+confirm pair keeps one job's events in order on the channel
    /// even when its confirm fails and is retried.
    lock: Mutex<()>,
    /// Bound on one publish, lock wait and confirm included.
    timeout: Duration,
    /// Accept announcements: no confirms (hints), and not behind the lock.
    announce: Option<Announcer>,
}

impl AmqpSink {
    /// `lanes` may be empty: events then share `channel`. `announce` (not
    /// in confirm mode) carries accept announcements; without it there are
    /// none.
    pub fn new(
        channel: Channel,
        lanes: Vec<Channel>,
        max_in_flight: usize,
        topology: Topology,
        timeout: Duration,
        announce: Option<Channel>,
    ) -> Arc<AmqpSink> {
        let announce = announce.map(|channel| Announcer {
            channel,
            exchange: topology.workers_exchange.clone(),
            timeout,
        });
        Arc::new(AmqpSink {
            channel,
            lanes,
            next_lane: Default::default(),
            max_in_flight,
            topology,
            lock: Mutex::new(()),
            timeout,
            announce,
        })
    }

    /// Publishes and waits for the broker's confirm, at most the publish
    /// timeout in all (one retry after a connection recovery included), so
    /// a stalled broker is an error for the caller, never a wait that holds
    /// the channel's lock forever.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        fence: Option<&(dyn Fn() -> bool + Sync)>,
    ) -> Result<(), PublishError> {
        let timeout_ms = self.timeout.as_millis() as u64;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let _guard = tokio::time::timeout_at(deadline, self.lock.lock())
            .await
            .map_err(|_| PublishError::Timeout { timeout_ms })?;
        let attempt = async {
            let mut last_err = None;
            for _ in 0..2 {
                if fence.is_some_and(|still_valid| !still_valid()) {
                    return Err(PublishError::Fenced);
                }
                let confirm = self
                    .channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        body,
                        props.clone(),
                    )
                    .await;
                let result = match confirm {
                    Ok(confirm) => confirm.await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(Confirmation::Ack(_)) | Ok(Confirmation::NotRequested) => return Ok(()),
                    Ok(Confirmation::Nack(_)) => {
                        return Err(PublishError::Nacked {
                            exchange: exchange.to_string(),
                        })
                    }
                    Err(e) => match self.channel.wait_for_recovery(e).await {
                        Ok(()) => continue,
                        Err(e) => {
                            last_err = Some(e);
                            break;
                        }
                    },
                }
            }
            Err(PublishError::Broker(
                last_err
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "channel did not recover".into()),
            ))
        };
        tokio::time::timeout_at(deadline, attempt)
            .await
            .unwrap_or(Err(PublishError::Timeout { timeout_ms }))
    }
}

#[async_trait::async_trait]
impl ReplySink for AmqpSink {
    async fn publish_event(
        &self,
        routing_key: &str,
        event: &EventV1,
        body: &[u8],
        from: &Attribution<'_>,
    ) -> Result<(), PublishError> {
        let props = event_properties(event, from);
        self.publish_confirmed(
            &self.topology.replies_exchange,
            routing_key,
            body,
            props,
            from.fence,
        )
        .await
    }

    fn event_lane(&self, observe: Option<ConfirmObserver>) -> Option<Box<dyn EventLane>> {
        let n = self
            .next_lane
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let channel = match self.lanes.len() {
            0 => self.channel.clone(),
            len => self.lanes[n % len].clone(),
        };
        Some(Box::new(AmqpLane::new(
            channel,
            self.topology.replies_exchange.clone(),
            self.timeout,
            self.max_in_flight,
            observe,
        )))
    }

    async fn publish_raw_event(
        &self,
        routing_key: &str,
        job_id: &str,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let parsed: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let type_name = parsed["type"].as_str().unwrap_or_default();
        let mut props = event_props(job_id, type_name);
        if let Some(seq) = parsed["seq"].as_u64() {
            props = props.with_message_id(format!("{job_id}:{seq}").as_str().into());
        }
        self.publish_confirmed(
            &self.topology.replies_exchange,
            routing_key,
            body,
            props,
            None,
        )
        .await
    }

    async fn publish_session_event(
        &self,
        kind: &str,
        event_id: i64,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let id = format!("session-event:{event_id}");
        let props = event_props(&id, kind).with_message_id(id.as_str().into());
        self.publish_confirmed(&self.topology.replies_exchange, kind, body, props, None)
            .await
    }

    async fn publish_control_result(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let props = event_props(request_id, "control_result");
        self.publish_confirmed(
            &self.topology.replies_exchange,
            routing_key,
            body,
            props,
            None,
        )
        .await
    }

    async fn publish_control(
        &self,
        body: &[u8],
        request_id: &str,
        reply_to: Option<&str>,
    ) -> Result<(), PublishError> {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(request_id.into());
        if let Some(r) = reply_to {
            props = props.with_reply_to(r.into());
        }
        self.publish_confirmed(&self.topology.control_exchange, "", body, props, None)
            .await
    }

    async fn announce_accept(&self, routing_key: &str, body: &[u8]) -> Result<(), PublishError> {
        match &self.announce {
            Some(announcer) => announcer.send(routing_key, body).await,
            None => Ok(()),
        }
    }

    async fn dead_letter(
        &self,
        original: &lapin::message::Delivery,
        reason: &str,
    ) -> Result<(), PublishError> {
        let mut headers = original.properties.headers().clone().unwrap_or_default();
        headers.insert(
            DEAD_LETTER_REASON_HEADER.into(),
            AMQPValue::LongString(reason.into()),
        );
        headers.insert(
            "x-original-routing-key".into(),
            AMQPValue::LongString(original.routing_key.as_str().into()),
        );
        let props = original
            .properties
            .clone()
            .with_headers(FieldTable::from(headers.inner().clone()));
        self.publish_confirmed(
            &self.topology.dead_letter_exchange,
            original.routing_key.as_str(),
            &original.data,
            props,
            None,
        )
        .await
    }
}

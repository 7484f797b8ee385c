//! A producer-side client: what `claude-worker submit` and `cancel` use, and
//! what a Rust program can use to send jobs and control messages and read
//! the answers.
//!
//! A [`Client`] owns one connection, a confirm channel for publishing, and a
//! private reply queue (exclusive, auto-delete, server-named) bound to
//! `<prefix>.replies` with a routing key of its own (`cli.<uuid>`). Jobs and
//! control messages it publishes carry that key in `reply_to`, so their
//! events and control results come back to it, and only to it.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer};
use serde_json::Value;

use crate::broker::publish::LEASE_EPOCH_HEADER;
use crate::broker::{self, AmqpError, Topology};
use crate::config::AmqpSettings;
use crate::protocol::{
    validate_job_id, ControlBody, ControlResultV1, ControlV1, EventBody, EventV1, JobV1,
    PROTOCOL_VERSION,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("RabbitMQ error: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker nacked the publish: it did not take the message.
    #[error("the broker refused the message to {exchange}")]
    Nacked { exchange: String },
    /// A mandatory publish no queue was bound for.
    #[error("{0}")]
    Unroutable(String),
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The reply consumer ended (connection closed and not recovered).
    #[error("the reply queue's consumer ended (connection to RabbitMQ lost?)")]
    ConsumerEnded,
    /// The connection was down and did not come back within the publish
    /// timeout.
    #[error("RabbitMQ was unreachable for {timeout_ms} ms")]
    Unreachable { timeout_ms: u64 },
}

/// One message read from the reply queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A reply event; `raw` is the body exactly as received, `lease_epoch`
    /// its `x-lease-epoch` header (absent on events of jobs that never ran
    /// and on republished duplicates), for [`JobTracker::accept`].
    Event {
        raw: String,
        event: EventV1,
        lease_epoch: Option<i64>,
    },
    /// The answer to a control message; `raw` is the body as received.
    ControlResult {
        raw: String,
        result: ControlResultV1,
        /// The AMQP `correlation_id` (the control message's request id).
        correlation_id: Option<String>,
    },
    /// Something that is neither (not JSON, another version, a type this
    /// client does not know). Callers should skip it.
    Unknown { raw: String, reason: String },
}

impl Incoming {
    /// Decodes a reply-queue body.
    pub fn decode(body: &[u8], correlation_id: Option<String>) -> Incoming {
        let raw = String::from_utf8_lossy(body).into_owned();
        let value: Value = match serde_json::from_str(&raw) {
            Ok(v) => v,
            Err(e) => {
                return Incoming::Unknown {
                    raw,
                    reason: format!("not JSON: {e}"),
                }
            }
        };
        if value.get("type").and_then(Value::as_str) == Some("control_result") {
            return match serde_json::from_value::<ControlResultV1>(value) {
                Ok(result) => Incoming::ControlResult {
                    raw,
                    result,
                    correlation_id,
                },
                Err(e) => Incoming::Unknown {
                    raw,
                    reason: format!("not a control_result: {e}"),
                },
            };
        }
        match serde_json::from_value::<EventV1>(value) {
            Ok(event) => Incoming::Event {
                raw,
                event,
                lease_epoch: None,
            },
            Err(e) => Incoming::Unknown {
                raw,
                reason: format!("not a v1 event: {e}"),
            },
        }
    }

    fn from_delivery(d: &Delivery) -> Incoming {
        let corr = d
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str().to_string());
        let mut incoming = Incoming::decode(&d.data, corr);
        if let Incoming::Event { lease_epoch, .. } = &mut incoming {
            *lease_epoch = header_i64(&d.properties, LEASE_EPOCH_HEADER);
        }
        incoming
    }
}

/// An integer header, whichever AMQP integer type carried it.
fn header_i64(props: &BasicProperties, key: &str) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// A connection to the broker with a private reply queue.
pub struct Client {
    conn: Connection,
    channel: Channel,
    topology: Topology,
    reply_key: String,
    consumer: Consumer,
    /// How long a publish waits for a dropped connection to come back.
    publish_timeout: Duration,
    /// The AMQP `user_id` property stamped on what this client publishes.
    user_id: Option<String>,
}

/// The AMQP user the settings connect as (the URL's user, `guest` when it
/// names none), which the broker verifies in a message's `user_id`.
pub fn amqp_user(settings: &AmqpSettings) -> Option<String> {
    let uri: lapin::uri::AMQPUri = settings.url.expose().parse().ok()?;
    Some(uri.authority.userinfo.username)
}

impl Client {
    /// Connects, declares the topology (idempotently, the same arguments the
    /// worker uses) and binds a private reply queue with a fresh
    /// `cli.<uuid>` routing key.
    pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Client, ClientError> {
        let conn = broker::connect(settings, name).await?;
        let channel = broker::confirm_channel(&conn).await?;
        let topology = Topology::from_settings(settings);
        topology.declare(&channel).await?;
        let reply_key = format!("cli.{}", uuid::Uuid::new_v4().simple());
        let consumer = broker::consume_private(
            &channel,
            &topology.replies_exchange,
            &[&reply_key],
            "",
            true,
        )
        .await?;
        Ok(Client {
            conn,
            channel,
            topology,
            reply_key,
            consumer,
            publish_timeout: Duration::from_millis(settings.publish_timeout_ms),
            user_id: None,
        })
    }

    /// Stamps every job and control message this client publishes with
    /// the AMQP `user_id` property (the broker refuses a `user_id` other
    /// than the connection's user, so it is broker-verified): what a job's
    /// `prompt_answerers` names.
    pub fn set_user_id(&mut self, user_id: Option<String>) {
        self.user_id = user_id;
    }

    fn stamp(&self, props: BasicProperties) -> BasicProperties {
        match &self.user_id {
            Some(u) => props.with_user_id(u.as_str().into()),
            None => props,
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The routing key this client's events and control results come back with.
    pub fn reply_key(&self) -> &str {
        &self.reply_key
    }

    /// Publishes a job, persistent and mandatory, and waits for the broker's
    /// confirm. Fills in `job_id` (a UUID) if the job has none; sets the
    /// `message_id` property to it and `reply_to` to this client's key
    /// (the body's `reply_to` is left as is, the property wins). Returns the
    /// job id. Publishing the same job (same `job_id`) again is safe: a
    /// worker runs a job id once and answers a duplicate of a finished job
    /// with its terminal event.
    pub async fn publish_job(&self, job: &JobV1) -> Result<String, ClientError> {
        let reply_key = self.reply_key.clone();
        self.publish_job_to(job, &reply_key).await
    }

    /// [`Client::publish_job`] with `reply_to` = `reply_key` instead of this
    /// client's own key: for a service whose events go to a durable queue
    /// of its own ([`ReplyConsumer`]).
    pub async fn publish_job_to(
        &self,
        job: &JobV1,
        reply_key: &str,
    ) -> Result<String, ClientError> {
        crate::protocol::validate_reply_to(reply_key).map_err(|e| ClientError::Invalid(e.0))?;
        let mut job = job.clone();
        let job_id = job
            .job_id
            .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
            .clone();
        validate_job_id(&job_id).map_err(|e| ClientError::Invalid(e.0))?;
        let body = serde_json::to_vec(&job).map_err(|e| ClientError::Invalid(e.to_string()))?;
        // Check the body the way the worker will, so a bad job fails here.
        crate::protocol::decode_job(&body).map_err(|e| ClientError::Invalid(e.0))?;
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(job_id.as_str().into())
            .with_reply_to(reply_key.into())
            .with_delivery_mode(2);
        let props = self.stamp(props);
        let exchange = self.topology.jobs_exchange.clone();
        let routing_key = self.topology.jobs_routing_key.clone();
        self.publish(&exchange, &routing_key, &body, props, || {
            format!("no queue is bound to {exchange} with routing key {routing_key}")
        })
        .await?;
        Ok(job_id)
    }

    /// Publishes a control message to `<prefix>.control` (every worker gets
    /// it) with `message_id` = a new request id and `reply_to` = this
    /// client's key, and returns the request id. Fails with
    /// [`ClientError::Unroutable`] if no worker is listening.
    pub async fn publish_control(&self, body: ControlBody) -> Result<String, ClientError> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let msg = ControlV1 {
            v: PROTOCOL_VERSION,
            body,
            reply_to: None,
        };
        let bytes = serde_json::to_vec(&msg).map_err(|e| ClientError::Invalid(e.to_string()))?;
        crate::protocol::decode_control(&bytes).map_err(|e| ClientError::Invalid(e.0))?;
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(request_id.as_str().into())
            .with_reply_to(self.reply_key.as_str().into())
            .with_type("control".into());
        let props = self.stamp(props);
        let exchange = self.topology.control_exchange.clone();
        self.publish(&exchange, "", &bytes, props, || {
            format!(
                "no worker is listening on the control exchange {exchange} \
                 (is a worker running? start one with `claude-worker worker`)"
            )
        })
        .await?;
        Ok(request_id)
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        unroutable: impl FnOnce() -> String,
    ) -> Result<(), ClientError> {
        // A dropped connection (a broker restart) is waited out, bounded,
        // and the message sent again: jobs and control requests carry their
        // ids, so a copy that did reach the broker runs once.
        let deadline = tokio::time::Instant::now() + self.publish_timeout;
        let confirm = loop {
            let sent = self
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    props.clone(),
                )
                .await;
            let error = match sent {
                Ok(confirm) => match confirm.await {
                    Ok(c) => break c,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            match tokio::time::timeout_at(deadline, self.channel.wait_for_recovery(error)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    let timeout_ms = self.publish_timeout.as_millis() as u64;
                    return Err(ClientError::Unreachable { timeout_ms });
                }
            }
        };
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(ClientError::Unroutable(unroutable())),
            Confirmation::Nack(_) => Err(ClientError::Nacked {
                exchange: exchange.to_string(),
            }),
        }
    }

    /// How many consumers (workers) the jobs queue has right now.
    pub async fn jobs_consumer_count(&self) -> Result<u32, ClientError> {
        let q = self
            .channel
            .queue_declare(
                self.topology.jobs_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(q.consumer_count())
    }

    /// The next message on the reply queue, or `None` if none arrives
    /// within `timeout`.
    /// A dropped connection (a broker restart) is waited out within
    /// `timeout`: the reply queue is recovered by name and reading goes on.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<Incoming>, ClientError> {
        let next = next_delivery(&mut self.consumer, &self.channel, timeout).await?;
        Ok(next.map(|d| Incoming::from_delivery(&d)))
    }

    /// Waits up to `timeout` for the control result answering `request_id`,
    /// skipping anything else. `None` if it did not come.
    pub async fn wait_control_result(
        &mut self,
        request_id: &str,
        timeout: Duration,
    ) -> Result<Option<ControlResultV1>, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.recv(left).await? {
                None => return Ok(None),
                Some(Incoming::ControlResult {
                    result,
                    correlation_id,
                    ..
                }) if result.request_id == request_id
                    || correlation_id.as_deref() == Some(request_id) =>
                {
                    return Ok(Some(result))
                }
                Some(_) => {}
            }
        }
    }

    /// Closes the connection (the reply queue goes with it).
    pub async fn close(self) {
        self.close_shared().await;
    }

    /// [`Client::close`] for a client shared behind an `Arc` (a service's
    /// long-lived publisher); later publishes fail.
    pub async fn close_shared(&self) {
        let _ = self.channel.close(200, "client done".into()).await;
        let _ = self.conn.close(200, "client done".into()).await;
    }
}

/// A durable, named reply queue (`<prefix>.replies.<name>`) bound to the
/// replies exchange with a routing key of the service's choosing, read with
/// manual acks: events published while the service is down wait for it,
/// and an event it had not acked when it died is delivered again. What a
/// long-lived front-end (the Discord relay) reads its events from.
pub struct ReplyConsumer {
    conn: Connection,
    channel: Channel,
    consumer: Consumer,
    queue: String,
}

/// Acknowledges one message read by [`ReplyConsumer::recv`].
pub struct Ack(lapin::Acker);

impl Ack {
    /// The message is handled: the broker forgets it.
    pub async fn ack(&self) -> Result<(), ClientError> {
        self.0
            .ack(lapin::options::BasicAckOptions::default())
            .await?;
        Ok(())
    }
}

impl ReplyConsumer {
    /// Connects, declares the topology and the durable queue
    /// `<prefix>.replies.<name>` bound with `routing_key`, and consumes it
    /// with at most `prefetch` unacked messages.
    pub async fn connect(
        settings: &AmqpSettings,
        name: &str,
        routing_key: &str,
        prefetch: u16,
    ) -> Result<ReplyConsumer, ClientError> {
        let conn = broker::connect(settings, name).await?;
        let channel = broker::consumer_channel(&conn, prefetch).await?;
        let topology = Topology::from_settings(settings);
        topology.declare(&channel).await?;
        let queue = format!("{}.{name}", topology.replies_exchange);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                topology.replies_exchange.as_str().into(),
                routing_key.into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                lapin::options::BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(ReplyConsumer {
            conn,
            channel,
            consumer,
            queue,
        })
    }

    /// The queue's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next message and its [`Ack`], or `None` if none arrives within
    /// `timeout`. Unacked messages go back to the queue when the
    /// connection closes.
    pub async fn recv(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<(Incoming, Ack)>, ClientError> {
        let next = next_delivery(&mut self.consumer, &self.channel, timeout).await?;
        Ok(next.map(|d| (Incoming::from_delivery(&d), Ack(d.acker))))
    }

    /// Closes the connection; unacked messages return to the queue.
    pub async fn close(self) {
        let _ = self.channel.close(200, "relay done".into()).await;
        let _ = self.conn.close(200, "relay done".into()).await;
    }
}

/// Follows one job's events and applies the reader's rules of the protocol
/// (docs/protocol.md, "Reading events"): it drops other jobs' events,
/// duplicates (a `seq` already seen), anything after the terminal event, and
/// any event whose lease epoch is lower than one already seen for the job —
/// a worker that was paused past its lease and spoke after its successor.
/// It keeps the text of the current attempt, discarding it when the
/// attempt is retried.
#[derive(Debug, Clone)]
pub struct JobTracker {
    job_id: String,
    seen: HashSet<u64>,
    /// The highest `x-lease-epoch` seen for the job.
    epoch: Option<i64>,
    /// Text of the attempt in progress.
    text: String,
    finished: bool,
}

/// What an accepted event means for someone printing the reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Not this job's, or already seen: ignore.
    Skip,
    /// A new event of the job (not terminal, not a retry).
    Event,
    /// The text of the attempt so far (returned) is void: the attempt
    /// failed and another follows (`retrying`), or its API stream was cut
    /// and the text events that follow restate it (`text_reset`).
    Retry { discarded: String },
    /// The job's terminal event.
    Terminal,
}

impl JobTracker {
    pub fn new(job_id: impl Into<String>) -> JobTracker {
        JobTracker {
            job_id: job_id.into(),
            seen: HashSet::new(),
            epoch: None,
            text: String::new(),
            finished: false,
        }
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The text of the attempt in progress (or of the last one).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Judges one event; `lease_epoch` is its `x-lease-epoch` header
    /// ([`Incoming::Event`] carries it), `None` where the event has none.
    pub fn accept(&mut self, ev: &EventV1, lease_epoch: Option<i64>) -> Step {
        if ev.job_id != self.job_id || self.finished {
            return Step::Skip;
        }
        if let (Some(e), Some(max)) = (lease_epoch, self.epoch) {
            if e < max {
                return Step::Skip;
            }
        }
        if !self.seen.insert(ev.seq) {
            return Step::Skip;
        }
        self.epoch = self.epoch.max(lease_epoch);
        match &ev.body {
            EventBody::Text { text } => {
                self.text.push_str(text);
                Step::Event
            }
            EventBody::Retrying { .. } | EventBody::TextReset { .. } => Step::Retry {
                discarded: std::mem::take(&mut self.text),
            },
            body if body.is_terminal() => {
                self.finished = true;
                Step::Terminal
            }
            _ => Step::Event,
        }
    }
}

/// The next delivery on a reply queue, or `None` if none arrives within
/// `timeout`. A dropped connection (a broker restart) is waited out within
/// `timeout`: the queue is recovered by name and reading goes on.
async fn next_delivery(
    consumer: &mut Consumer,
    channel: &Channel,
    timeout: Duration,
) -> Result<Option<Delivery>, ClientError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Err(_) => return Ok(None),
            Ok(next) => next,
        };
        match next {
            None => return Err(ClientError::ConsumerEnded),
            Some(Ok(d)) => return Ok(Some(d)),
            Some(Err(e)) => {
                match tokio::time::timeout_at(deadline, channel.wait_for_recovery(e)).await {
                    Err(_) => return Ok(None),
                    Ok(Err(e)) => return Err(ClientError::Broker(e)),
                    Ok(Ok(())) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(seq: u64, attempt: u32, body: Value) -> EventV1 {
        let mut v = json!({"v": 1, "job_id": "j1", "session_key": "k", "seq": seq,
                           "attempt": attempt, "metadata": {}});
        v.as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn tracker_restarts_the_text_on_text_reset() {
        let mut t = JobTracker::new("j1");
        t.accept(&ev(0, 1, json!({"type": "text", "text": "The ans"})), None);
        let reset = json!({"type": "text_reset", "reason": "cut"});
        assert_eq!(
            t.accept(&ev(1, 1, reset), None),
            Step::Retry {
                discarded: "The ans".into()
            }
        );
        t.accept(
            &ev(2, 1, json!({"type": "text", "text": "The answer"})),
            None,
        );
        assert_eq!(t.text(), "The answer");
    }

    #[test]
    fn tracker_dedups_discards_retried_text_and_stops_at_terminal() {
        let mut t = JobTracker::new("j1");
        assert_eq!(
            t.accept(&ev(0, 1, json!({"type": "text", "text": "Hel"})), None),
            Step::Event
        );
        assert_eq!(
            t.accept(&ev(0, 1, json!({"type": "text", "text": "Hel"})), None),
            Step::Skip,
            "duplicate seq"
        );
        let retry = json!({"type": "retrying", "next_attempt": 2, "delay_ms": 0, "reason": "x"});
        assert_eq!(
            t.accept(&ev(1, 1, retry), None),
            Step::Retry {
                discarded: "Hel".into()
            }
        );
        t.accept(&ev(2, 2, json!({"type": "text", "text": "Hello"})), None);
        assert_eq!(t.text(), "Hello");
        let mut other = ev(3, 2, json!({"type": "text", "text": "nope"}));
        other.job_id = "j2".into();
        assert_eq!(t.accept(&other, None), Step::Skip, "another job");
        assert_eq!(
            t.accept(&ev(4, 2, json!({"type": "cancelled", "reason": "r"})), None),
            Step::Terminal
        );
        assert!(t.is_finished());
        assert_eq!(
            t.accept(&ev(5, 2, json!({"type": "text", "text": "late"})), None),
            Step::Skip
        );
    }

    #[test]
    fn tracker_drops_events_of_an_older_lease_epoch() {
        let mut t = JobTracker::new("j1");
        let text = |s: &str| json!({"type": "text", "text": s});
        assert_eq!(t.accept(&ev(0, 1, text("old ")), Some(3)), Step::Event);
        // The successor (epoch 4) retries the attempt after a takeover…
        let retry =
            json!({"type": "retrying", "next_attempt": 2, "delay_ms": 0, "reason": "worker_lost"});
        assert_eq!(
            t.accept(&ev(1, 1, retry), Some(4)),
            Step::Retry {
                discarded: "old ".into()
            }
        );
        assert_eq!(t.accept(&ev(2, 2, text("new")), Some(4)), Step::Event);
        // …and the paused worker wakes and speaks late: dropped, whatever its seq.
        assert_eq!(t.accept(&ev(3, 1, text("stale")), Some(3)), Step::Skip);
        assert_eq!(t.accept(&ev(7, 1, text("stale")), Some(3)), Step::Skip);
        // Events without the header (a republished duplicate) are judged
        // by seq and terminal alone.
        assert_eq!(t.accept(&ev(4, 2, text("!")), None), Step::Event);
        assert_eq!(t.text(), "new!");
        let done = json!({"type": "cancelled", "reason": "r"});
        assert_eq!(t.accept(&ev(5, 2, done), Some(4)), Step::Terminal);
        assert_eq!(t.accept(&ev(6, 2, text("after")), Some(5)), Step::Skip);
    }

    #[test]
    fn incoming_decodes_events_control_results_and_junk() {
        let e = br#"{"v":1,"job_id":"j","session_key":"k","seq":0,"attempt":1,"type":"text","text":"hi","metadata":{}}"#;
        assert!(
            matches!(Incoming::decode(e, None), Incoming::Event { ref raw, .. } if raw.as_bytes() == e)
        );
        let c = br#"{"v":1,"type":"control_result","request_id":"r1","ok":true,"outcome":"cancelled","message":"m","job_id":"j"}"#;
        match Incoming::decode(c, Some("r1".into())) {
            Incoming::ControlResult { result, .. } => {
                assert!(result.ok);
                assert_eq!(result.request_id, "r1");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Incoming::decode(b"nope", None),
            Incoming::Unknown { .. }
        ));
        assert!(matches!(
            Incoming::decode(br#"{"type":"mystery"}"#, None),
            Incoming::Unknown { .. }
        ));
    }
}

//! Talking to a broker that restarts: a durable tap on the replies
//! exchange that reconnects (nothing the broker confirmed is missed), and a
//! producer connection made once the broker is up.

use std::time::Duration;

use claude_worker::broker::Topology;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::world::WAIT;

/// What the tap saw: a reply body and its `x-lease-epoch` header.
pub type Seen = (Value, Option<i64>);

/// Consumes a durable queue bound to the replies exchange, reconnecting
/// after the broker comes back; acks after forwarding, so a delivery cut
/// by the restart comes again (the reader dedups on job and seq).
pub fn tap(url: String, topo: Topology, queue: String) -> mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while !tx.is_closed() {
            if let Err(e) = tap_once(&url, &topo, &queue, &tx).await {
                tracing::debug!(error = %e, "tap: reconnecting");
            }
            // Pace reconnection attempts while the broker is down.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    rx
}

async fn tap_once(
    url: &str,
    topo: &Topology,
    queue: &str,
    tx: &mpsc::UnboundedSender<Seen>,
) -> Result<(), lapin::Error> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    topo.declare(&ch).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, FieldTable::default())
        .await?;
    ch.queue_bind(
        queue.into(),
        topo.replies_exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "tap".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(d) = consumer.next().await {
        let d = d?;
        let raw: Value = serde_json::from_slice(&d.data).expect("replies are JSON");
        let epoch = match d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-lease-epoch").cloned())
        {
            Some(AMQPValue::LongLongInt(n)) => Some(n),
            _ => None,
        };
        let _ = tx.send((raw, epoch));
        d.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// A producer connection (the test's), made after the broker is up.
pub async fn producer(url: &str, topo: &Topology) -> Channel {
    let deadline = Instant::now() + WAIT;
    loop {
        let attempt = async {
            let conn = Connection::connect(url, ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            topo.declare(&ch).await?;
            Ok::<_, lapin::Error>(ch)
        };
        match attempt.await {
            Ok(ch) => return ch,
            Err(e) => assert!(Instant::now() < deadline, "no producer connection: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes a v1 job of session `key` (replies to `reply_key`) and waits
/// for the broker's confirm; returns its new job id.
pub async fn publish_job(
    ch: &Channel,
    topo: &Topology,
    reply_key: &str,
    key: &str,
    prompt: &str,
) -> String {
    let job_id = uuid::Uuid::new_v4().to_string();
    let body = serde_json::json!({"v": 1, "job_id": job_id, "session_key": key, "prompt": prompt});
    publish(
        ch,
        &topo.jobs_exchange,
        &topo.jobs_routing_key,
        reply_key,
        &body,
    )
    .await;
    job_id
}

/// Publishes `body` and waits for the broker's confirm; panics if it fails.
pub async fn publish(ch: &Channel, exchange: &str, key: &str, reply_to: &str, body: &Value) {
    assert!(
        try_publish(ch, exchange, key, reply_to, body).await,
        "publish to {exchange} failed"
    );
}

/// [`publish`], false if the broker did not take it (bounded).
pub async fn try_publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    reply_to: &str,
    body: &Value,
) -> bool {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_reply_to(reply_to.into())
        .with_delivery_mode(2)
        .with_message_id(uuid::Uuid::new_v4().to_string().into());
    let sent = async {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            props,
        )
        .await?
        .await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), sent).await,
        Ok(Ok(c)) if c.is_ack()
    )
}

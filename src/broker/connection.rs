//! RabbitMQ connection and topology, shared by every stage that talks to
//! the broker. All names derive from `amqp.prefix` (default `claude`).

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use std::time::Duration;

use crate::config::{redact_url, AmqpSettings};

/// Header carrying the reason a job was dead-lettered by the worker.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-claude-worker-error";
/// Quorum-queue delivery limit: a message that keeps coming back (e.g. it
/// crashes whatever consumes it) is dead-lettered by the broker instead of
/// looping forever.
pub const DELIVERY_LIMIT: i64 = 20;

/// The exchange and queue names of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub jobs_exchange: String,
    pub jobs_queue: String,
    pub jobs_routing_key: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub replies_exchange: String,
    /// Fanout exchange for control messages (cancel, set_permission_mode);
    /// every worker binds its own queue to it.
    pub control_exchange: String,
    /// Direct exchange for what workers tell one another (accept
    /// announcements): each worker binds its own queue with its id and
    /// `waiting`.
    pub workers_exchange: String,
}

impl Topology {
    pub fn from_prefix(prefix: &str, jobs_routing_key: &str) -> Topology {
        Topology {
            jobs_exchange: format!("{prefix}.jobs"),
            jobs_queue: format!("{prefix}.jobs.{jobs_routing_key}"),
            jobs_routing_key: jobs_routing_key.to_string(),
            dead_letter_exchange: format!("{prefix}.jobs.dlx"),
            dead_letter_queue: format!("{prefix}.jobs.dead"),
            replies_exchange: format!("{prefix}.replies"),
            control_exchange: format!("{prefix}.control"),
            workers_exchange: format!("{prefix}.workers"),
        }
    }

    pub fn from_settings(s: &AmqpSettings) -> Topology {
        Topology::from_prefix(&s.prefix, &s.jobs_routing_key)
    }

    /// Declares everything, idempotently. Safe to run from every worker
    /// (and from producers) at start-up.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.jobs_exchange.as_str().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.replies_exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.control_exchange.as_str().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.workers_exchange.as_str().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;

        let queue_opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mut dead_args = FieldTable::default();
        dead_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare(
                self.dead_letter_queue.as_str().into(),
                queue_opts,
                dead_args,
            )
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut job_args = FieldTable::default();
        job_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        job_args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange.as_str().into()),
        );
        job_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        channel
            .queue_declare(self.jobs_queue.as_str().into(), queue_opts, job_args)
            .await?;
        channel
            .queue_bind(
                self.jobs_queue.as_str().into(),
                self.jobs_exchange.as_str().into(),
                self.jobs_routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }
}

impl Topology {
    /// Deletes every queue and exchange of this topology (tests and
    /// benchmarks tearing down their own random prefix). Best effort.
    pub async fn delete(&self, channel: &Channel) {
        for q in [&self.jobs_queue, &self.dead_letter_queue] {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [
            &self.jobs_exchange,
            &self.dead_letter_exchange,
            &self.replies_exchange,
            &self.control_exchange,
            &self.workers_exchange,
        ] {
            let _ = channel
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error(
        "could not connect to RabbitMQ at {url}: {reason}. Is it running? \
         Start one with `docker compose up -d rabbitmq` (or `rabbitmq-server -detached`), \
         or point CLAUDE_WORKER__AMQP__URL at yours."
    )]
    Connect { url: String, reason: String },
    #[error("RabbitMQ error: {0}")]
    Broker(#[from] lapin::Error),
    /// Opening channels, declaring the topology or starting the consumers
    /// did not finish in time (a busy broker, or a stalled connection).
    #[error(
        "RabbitMQ did not finish setting up the worker's channels and consumers within {secs} s"
    )]
    SetupTimeout { secs: u64 },
}

impl AmqpError {
    /// Worth trying again shortly: the broker answered but failed this
    /// time (an internal error while several clients declare the same
    /// topology, a lock, a dropped connection). Not: nothing listening
    /// (`Connect`: say so at once), refused credentials or permissions, or
    /// a declaration that contradicts the existing one (fix the config).
    pub fn is_transient(&self) -> bool {
        use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
        let e = match self {
            AmqpError::Broker(e) => e,
            // A fresh connection may well do it: retried within start-up's
            // bound like a broker's transient error.
            AmqpError::SetupTimeout { .. } => return true,
            AmqpError::Connect { .. } => return false,
        };
        match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => !matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(
                    AMQPSoftError::ACCESSREFUSED | AMQPSoftError::PRECONDITIONFAILED
                ) | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
            ),
            lapin::ErrorKind::IOError(_)
            | lapin::ErrorKind::InvalidChannelState(..)
            | lapin::ErrorKind::InvalidConnectionState(_) => true,
            _ => false,
        }
    }
}

/// How long the first connection may take before start-up fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Connects with automatic connection and topology recovery on. The first
/// connection fails fast with a message a user can act on: recovery's
/// backoff would otherwise keep retrying silently for minutes.
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, AmqpError> {
    let url = settings.url.expose();
    let connect_error = |reason: String| AmqpError::Connect {
        url: redact_url(url),
        reason,
    };
    if let Some(addr) = host_port(url) {
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(connect_error(e.to_string())),
            Err(_) => {
                return Err(connect_error(format!(
                    "no answer within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )))
            }
        }
    }
    // Reconnect quickly (lapin's default waits 1 s doubling to 60 s, so a
    // broker back after 20 s was only found again ~30 s later), and keep
    // trying at least as long as the worker waits (`recovery_limit_secs`).
    let attempts = (settings.recovery_limit_secs / 2 + 5) as usize;
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(name))
        .configure_backoff(move |b| {
            b.with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(2))
                .with_jitter()
                .with_max_times(attempts)
        })
        .enable_auto_recover();
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(connect_error(e.to_string())),
        Err(_) => Err(connect_error(format!(
            "the AMQP handshake did not finish within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// `host:port` of an AMQP URL (default ports 5672 / 5671 for amqps).
fn host_port(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let authority = rest.split(['/', '?']).next()?;
    if authority.is_empty() {
        return None;
    }
    if authority.contains(':') && !authority.ends_with(']') {
        return Some(authority.to_string());
    }
    let port = if scheme == "amqps" { 5671 } else { 5672 };
    Some(format!("{authority}:{port}"))
}

/// A channel with publisher confirms on, for events and dead letters.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, AmqpError> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// A channel for consuming with a prefetch limit.
pub async fn consumer_channel(conn: &Connection, prefetch: u16) -> Result<Channel, AmqpError> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok(ch)
}

/// Declares an exclusive, auto-delete queue bound to `exchange` with
/// each of `routing_keys`, and consumes it: a worker's control queue, a client's
/// reply queue. The queue is named here (`<exchange>.private.<uuid>`), not
/// by the server: after a broker restart or a dropped connection lapin's
/// recovery re-declares it by name, and the broker refuses to let a client
/// declare an `amq.gen-…` name.
pub async fn consume_private(
    channel: &Channel,
    exchange: &str,
    routing_keys: &[&str],
    consumer_tag: &str,
    no_ack: bool,
) -> Result<Consumer, lapin::Error> {
    let name = format!("{exchange}.private.{}", uuid::Uuid::new_v4().simple());
    let queue = channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    for routing_key in routing_keys {
        channel
            .queue_bind(
                queue.name().as_str().into(),
                exchange.into(),
                (*routing_key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .basic_consume(
            queue.name().as_str().into(),
            consumer_tag.into(),
            BasicConsumeOptions {
                no_ack,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Reads a string-ish header value.
pub fn header_str(headers: &Option<FieldTable>, key: &str) -> Option<String> {
    let table = headers.as_ref()?;
    let key: ShortString = key.into();
    match table.inner().get(&key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_port_of_amqp_urls() {
        assert_eq!(
            host_port("amqp://u:p@h:5673/%2f").as_deref(),
            Some("h:5673")
        );
        assert_eq!(host_port("amqp://h").as_deref(), Some("h:5672"));
        assert_eq!(host_port("amqps://u@h/v").as_deref(), Some("h:5671"));
    }
}

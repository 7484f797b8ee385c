//! Accept announcements between workers (see `worker/accept_feed.rs`):
//! published to the direct exchange `<prefix>.workers` on a channel of
//! their own, not in confirm mode — they are hints, and a lost one costs a
//! lease holder a poll interval.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};

use crate::broker::publish::PublishError;

/// The AMQP `type` of an accept announcement.
pub const ACCEPT_ANNOUNCEMENT_TYPE: &str = "claude_worker.accepted";

pub(crate) struct Announcer {
    pub channel: Channel,
    pub exchange: String,
    pub timeout: Duration,
}

impl Announcer {
    /// Writes one announcement (bounded); nothing further to wait for.
    pub async fn send(&self, routing_key: &str, body: &[u8]) -> Result<(), PublishError> {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type(ACCEPT_ANNOUNCEMENT_TYPE.into());
        let send = self.channel.basic_publish(
            self.exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        );
        match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(PublishError::Broker(e.to_string())),
            Err(_) => Err(PublishError::Timeout {
                timeout_ms: self.timeout.as_millis() as u64,
            }),
        }
    }
}

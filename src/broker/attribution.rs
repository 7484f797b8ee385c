//! Who publishes an event, and the AMQP properties that say so: the
//! `x-worker-id` and `x-lease-epoch` headers consumers can check.

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

use crate::protocol::EventV1;

/// Who publishes an event: the worker and the session lease epoch it holds,
/// and — for events that are only valid under a live lease — the check of
/// it, run again right before the frame goes to the broker (after the wait
/// for the channel), so no event of a lost lease is queued behind others.
#[derive(Clone, Copy)]
pub struct Attribution<'a> {
    pub worker_id: &'a str,
    pub lease_epoch: i64,
    pub fence: Option<&'a (dyn Fn() -> bool + Sync)>,
}

impl std::fmt::Debug for Attribution<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attribution")
            .field("worker_id", &self.worker_id)
            .field("lease_epoch", &self.lease_epoch)
            .field("fenced", &self.fence.is_some())
            .finish()
    }
}

/// AMQP header naming the worker that published an event.
pub const WORKER_ID_HEADER: &str = "x-worker-id";
/// AMQP header carrying the session lease epoch an event was published under.
pub const LEASE_EPOCH_HEADER: &str = "x-lease-epoch";

/// An event's AMQP properties: JSON, persistent, the job as correlation id,
/// `<job_id>:<seq>` as message id, and who published it.
pub(crate) fn event_properties(event: &EventV1, from: &Attribution<'_>) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        WORKER_ID_HEADER.into(),
        AMQPValue::LongString(from.worker_id.into()),
    );
    headers.insert(
        LEASE_EPOCH_HEADER.into(),
        AMQPValue::LongLongInt(from.lease_epoch),
    );
    event_props(&event.job_id, event.body.type_name())
        .with_message_id(format!("{}:{}", event.job_id, event.seq).as_str().into())
        .with_headers(headers)
}

pub(crate) fn event_props(job_id: &str, type_name: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id(job_id.into())
        .with_type(type_name.into())
        .with_delivery_mode(2)
}

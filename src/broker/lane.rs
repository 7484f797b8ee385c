//! A job's events on one confirm channel, pipelined: an event goes out
//! without waiting for the confirm of the one before, and the lane waits
//! for confirms only when it must — when `max_in_flight` are unconfirmed,
//! and in [`EventLane::settle`], which the turn calls before anything
//! durable (the outcome commit, a retry). AMQP keeps a channel's messages in
//! order, so the events of a job reach the exchange in order.
//!
//! If the channel fails, the lane waits (bounded) for lapin's recovery and
//! sends again, in order, every event not yet confirmed: a consumer may see
//! one twice (same `job_id` and `seq`, same AMQP `message_id`), never out of
//! order or missing. Every wait is bounded by the publish timeout; past it
//! the error goes to the turn, whose job stays in the database.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use lapin::options::BasicPublishOptions;
use lapin::PublisherConfirm;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::time::Instant;

use super::publish::{Attribution, PublishError};
use crate::protocol::EventV1;

/// Told how long each confirm took (the publish confirm latency metric).
pub type ConfirmObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// The fence of [`Attribution`]: still allowed to publish?
pub type Fence<'a> = Option<&'a (dyn Fn() -> bool + Sync)>;

/// Where one job's non-terminal events go, in order.
#[async_trait::async_trait]
pub trait EventLane: Send + Sync {
    /// Sends one event (serialised in `body`) to `routing_key`. Returns once
    /// it is on its way; waits for earlier confirms only to keep at most
    /// `max_in_flight` unconfirmed. The fence is checked right before the
    /// frame goes out (and before any resend).
    async fn send(
        &mut self,
        routing_key: &str,
        event: &EventV1,
        body: Vec<u8>,
        from: &Attribution<'_>,
    ) -> Result<(), PublishError>;

    /// Waits until every event sent so far is confirmed by the broker.
    async fn settle(&mut self, fence: Fence<'_>) -> Result<(), PublishError>;
}

struct InFlight {
    routing_key: String,
    body: Vec<u8>,
    props: BasicProperties,
    sent_at: Instant,
    /// None: its frame did not go out (the channel failed); sent again on
    /// recovery.
    confirm: Option<PublisherConfirm>,
    /// The broker refused it.
    nacked: bool,
}

/// An [`EventLane`] on a confirm channel of the worker's publish pool.
pub struct AmqpLane {
    channel: Channel,
    exchange: String,
    timeout: Duration,
    max_in_flight: usize,
    in_flight: VecDeque<InFlight>,
    observe: Option<ConfirmObserver>,
}

impl AmqpLane {
    pub(crate) fn new(
        channel: Channel,
        exchange: String,
        timeout: Duration,
        max_in_flight: usize,
        observe: Option<ConfirmObserver>,
    ) -> AmqpLane {
        AmqpLane {
            channel,
            exchange,
            timeout,
            max_in_flight: max_in_flight.max(1),
            in_flight: VecDeque::new(),
            observe,
        }
    }

    fn timeout_err(&self) -> PublishError {
        PublishError::Timeout {
            timeout_ms: self.timeout.as_millis() as u64,
        }
    }

    /// Drops confirmed events from the front without waiting.
    fn reap(&mut self) -> Result<(), lapin::Error> {
        while let Some(front) = self.in_flight.front_mut() {
            if front.nacked {
                return Ok(());
            }
            let Some(confirm) = front.confirm.as_mut() else {
                return Ok(());
            };
            match confirm.now_or_never() {
                None => return Ok(()),
                Some(r) => self.confirmed(r)?,
            }
        }
        Ok(())
    }

    /// Waits for the front event's confirm.
    async fn confirm_front(&mut self, deadline: Instant) -> Result<(), LaneFault> {
        let Some(front) = self.in_flight.front_mut() else {
            return Ok(());
        };
        let Some(confirm) = front.confirm.as_mut() else {
            return Err(LaneFault::Unsent);
        };
        match tokio::time::timeout_at(deadline, confirm).await {
            Err(_) => Err(LaneFault::Final(self.timeout_err())),
            Ok(r) => self.confirmed(r).map_err(LaneFault::Channel),
        }
    }

    /// The front event's confirm arrived: a channel error is returned for
    /// recovery; an ack pops it; a nack becomes an error of its own kind.
    fn confirmed(&mut self, r: lapin::Result<Confirmation>) -> Result<(), lapin::Error> {
        match r {
            Err(e) => Err(e),
            Ok(Confirmation::Nack(_)) => {
                // Not sent again: the broker refused it. It stays at the
                // front, so every later call reports it.
                if let Some(front) = self.in_flight.front_mut() {
                    front.nacked = true;
                }
                Ok(())
            }
            Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => {
                if let Some(done) = self.in_flight.pop_front() {
                    if let Some(observe) = &self.observe {
                        observe(done.sent_at.elapsed());
                    }
                }
                Ok(())
            }
        }
    }

    fn nacked(&self) -> Option<PublishError> {
        let front = self.in_flight.front()?;
        front.nacked.then(|| PublishError::Nacked {
            exchange: self.exchange.clone(),
        })
    }

    async fn frame(
        &self,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> lapin::Result<PublisherConfirm> {
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
    }

    /// After a channel error: waits for lapin's recovery, then sends every
    /// unconfirmed event again, in order. Once per call of `send`/`settle`.
    async fn recover(
        &mut self,
        error: Option<lapin::Error>,
        fence: Fence<'_>,
        deadline: Instant,
    ) -> Result<(), PublishError> {
        if let Some(error) = error {
            match tokio::time::timeout_at(deadline, self.channel.wait_for_recovery(error)).await {
                Err(_) => return Err(self.timeout_err()),
                Ok(Err(e)) => return Err(PublishError::Broker(e.to_string())),
                Ok(Ok(())) => {}
            }
        }
        let pending = std::mem::take(&mut self.in_flight);
        for item in pending {
            if fence.is_some_and(|still_valid| !still_valid()) {
                return Err(PublishError::Fenced);
            }
            let sent = tokio::time::timeout_at(
                deadline,
                self.frame(&item.routing_key, &item.body, item.props.clone()),
            )
            .await
            .map_err(|_| self.timeout_err())?
            .map_err(|e| PublishError::Broker(e.to_string()))?;
            self.in_flight.push_back(InFlight {
                confirm: Some(sent),
                sent_at: Instant::now(),
                ..item
            });
        }
        Ok(())
    }

    /// Waits until at most `keep` events are unconfirmed.
    async fn drain_to(
        &mut self,
        keep: usize,
        fence: Fence<'_>,
        deadline: Instant,
    ) -> Result<(), PublishError> {
        let mut recovered = false;
        while self.in_flight.len() > keep {
            if let Some(e) = self.nacked() {
                return Err(e);
            }
            match self.confirm_front(deadline).await {
                Ok(()) => {}
                Err(LaneFault::Final(e)) => return Err(e),
                Err(LaneFault::Channel(e)) if !recovered => {
                    recovered = true;
                    self.recover(Some(e), fence, deadline).await?;
                }
                Err(LaneFault::Unsent) if !recovered => {
                    recovered = true;
                    self.recover(None, fence, deadline).await?;
                }
                Err(LaneFault::Channel(e)) => return Err(PublishError::Broker(e.to_string())),
                Err(LaneFault::Unsent) => {
                    return Err(PublishError::Broker(
                        "the publish channel did not recover".into(),
                    ))
                }
            }
        }
        match self.nacked() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

enum LaneFault {
    /// The channel failed: recover and send again.
    Channel(lapin::Error),
    /// The front event never went out (a failed send): send again.
    Unsent,
    Final(PublishError),
}

#[async_trait::async_trait]
impl EventLane for AmqpLane {
    async fn send(
        &mut self,
        routing_key: &str,
        event: &EventV1,
        body: Vec<u8>,
        from: &Attribution<'_>,
    ) -> Result<(), PublishError> {
        let deadline = Instant::now() + self.timeout;
        if let Err(e) = self.reap() {
            self.recover(Some(e), from.fence, deadline).await?;
        }
        self.drain_to(self.max_in_flight - 1, from.fence, deadline)
            .await?;
        if from.fence.is_some_and(|still_valid| !still_valid()) {
            return Err(PublishError::Fenced);
        }
        let props = super::publish::event_properties(event, from);
        let sent = tokio::time::timeout_at(deadline, self.frame(routing_key, &body, props.clone()))
            .await
            .map_err(|_| self.timeout_err())?;
        let confirm = match sent {
            Ok(confirm) => confirm,
            Err(e) => {
                // Sent again with the others once the channel is back.
                self.in_flight.push_back(InFlight {
                    routing_key: routing_key.to_string(),
                    body,
                    props,
                    sent_at: Instant::now(),
                    confirm: None,
                    nacked: false,
                });
                return self.recover(Some(e), from.fence, deadline).await;
            }
        };
        self.in_flight.push_back(InFlight {
            routing_key: routing_key.to_string(),
            body,
            props,
            sent_at: Instant::now(),
            confirm: Some(confirm),
            nacked: false,
        });
        Ok(())
    }

    async fn settle(&mut self, fence: Fence<'_>) -> Result<(), PublishError> {
        let deadline = Instant::now() + self.timeout;
        self.drain_to(0, fence, deadline).await
    }
}

//! The worker's long-lived tasks, by name. Any of them ending before
//! shutdown is a failure: the worker logs it once and stops (gracefully),
//! and `Worker::wait` says which task ended, so the process exits non-zero
//! and its supervisor restarts it — instead of a worker that acks jobs it
//! will never run.

use std::any::Any;
use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::warn;

#[derive(Default)]
pub(crate) struct Supervisor {
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Supervisor {
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push((name, tokio::spawn(task)));
    }

    /// Waits until any task ends and says how; pending if there are none.
    pub async fn first_exit(&mut self) -> String {
        if self.tasks.is_empty() {
            return std::future::pending().await;
        }
        let handles = self.tasks.iter_mut().map(|(_, h)| h);
        let (result, i, _) = futures_util::future::select_all(handles).await;
        let (name, _) = self.tasks.remove(i);
        match result {
            Ok(()) => format!("the {name} stopped"),
            Err(e) if e.is_panic() => {
                format!("the {name} panicked: {}", panic_message(&*e.into_panic()))
            }
            Err(e) => format!("the {name} was cancelled: {e}"),
        }
    }

    /// Waits for the named task to end, at most `bound` (then aborts it).
    pub async fn join(&mut self, name: &'static str, bound: Duration) {
        let Some(i) = self.tasks.iter().position(|(n, _)| *n == name) else {
            return; // it already ended (and was reported)
        };
        let (_, mut handle) = self.tasks.remove(i);
        if tokio::time::timeout(bound, &mut handle).await.is_err() {
            warn!(
                task = name,
                bound_ms = bound.as_millis() as u64,
                "a task did not stop in time; aborting it"
            );
            handle.abort();
        }
    }
}

/// The text of a panic payload (`panic!` with a message gives a `&str` or
/// a `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

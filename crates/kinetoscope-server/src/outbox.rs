//! The webhook outbox's sender: each API node claims the events that are due from the store (so each is sent by
//! one node at a time), makes one attempt at each, and records what became of it. An event waits in the store
//! until every target took it or its attempts ran out, across restarts and across nodes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::off_async;
use crate::store::{JobStore, PendingEvent};
use crate::webhooks::Webhooks;

/// Events claimed at once; their attempts run side by side.
const BATCH: usize = 16;
/// How often the store is looked at for events due (retries, other nodes' events); an end in this process
/// wakes it at once.
const POLL: Duration = Duration::from_millis(250);

/// Sends the store's due events until the task is dropped.
pub async fn run(store: Arc<dyn JobStore>, webhooks: Webhooks, wake: Arc<Notify>) {
    loop {
        let claiming = store.clone();
        let claim = webhooks.attempt_time();
        let claimed = off_async("read the webhook outbox", move || claiming.due_events(BATCH, claim)).await;
        let events = claimed.unwrap_or_default();
        let full = events.len() == BATCH;
        futures_util::future::join_all(events.iter().map(|event| send(&store, &webhooks, event))).await;
        if !full {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

async fn send(store: &Arc<dyn JobStore>, webhooks: &Webhooks, event: &PendingEvent) {
    let attempted = webhooks.attempt(event).await;
    let (store, id) = (store.clone(), event.id.clone());
    // Not recorded, the claim lapses and the event is tried again: a receiver may see it twice (same `webhook-id`).
    let what = format!("record an attempt at webhook {}", event.id);
    off_async(&what, move || store.event_attempted(&id, &attempted.delivered, attempted.retry_in)).await;
}

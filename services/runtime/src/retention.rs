//! Retention: deleting outbox entries every consumer the log is kept for has acknowledged, and any
//! beyond the size bound; the outbox's size and backlog as metrics on the same tick.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{Store, blocking};

/// How much of the outbox to keep.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Entries kept at most, acknowledged or not; older ones are deleted and reading them is
    /// `OUT_OF_RANGE`.
    pub max_entries: u64,
    /// How often retention looks for entries to delete.
    pub interval: Duration,
}

/// Entries deleted per transaction, so a large cut never holds the writer for long.
const TRIM_CHUNK: u64 = 10_000;

/// Deletes outbox entries every registered consumer has acknowledged, and any beyond
/// `retention.max_entries`, until `shutdown`; reports the outbox's size and backlog as metrics on the
/// same tick, labelled with the stage and the store's partition.
pub async fn run_retention(
    stage: &'static str,
    store: Store,
    retention: Retention,
    shutdown: CancellationToken,
) {
    let partition = store.partition().index.to_string();
    let mut tick = tokio::time::interval(retention.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if store.fault().is_some() {
            // Nothing can be deleted while the store cannot commit; recovery is under way.
            continue;
        }
        let outbox = store.outbox();
        let trimmed = blocking(move || -> Result<u64, crate::store::StoreError> {
            let (first, next) = outbox.bounds()?;
            let acked = outbox.positions()?.into_iter().map(|(_, o)| o).min();
            let by_ack = acked.unwrap_or(first);
            let by_size = next.saturating_sub(retention.max_entries);
            let cutoff = by_ack.max(by_size);
            let mut removed = 0;
            while removed < cutoff.saturating_sub(first) {
                let n = outbox.trim(cutoff, TRIM_CHUNK)?;
                if n == 0 {
                    break;
                }
                removed += n;
            }
            Ok(removed)
        })
        .await;
        match trimmed {
            Ok(Ok(0)) | Err(_) => {}
            Ok(Ok(n)) => tracing::debug!(%partition, entries = n, "retention trimmed the outbox"),
            Ok(Err(e)) => tracing::warn!(%partition, error = %e, "retention failed"),
        }
        let outbox = store.outbox();
        let reader = outbox.clone();
        if let Ok(Ok((first, next))) = blocking(move || reader.bounds()).await {
            let labels = [
                ("stage", stage.to_owned()),
                ("partition", partition.clone()),
            ];
            metrics::gauge!(crate::metrics::OUTBOX_ENTRIES, &labels).set((next - first) as f64);
            metrics::gauge!(crate::metrics::OUTBOX_NEXT_OFFSET, &labels).set(next as f64);
            metrics::gauge!(crate::metrics::BACKLOG, &labels).set(outbox.unconsumed() as f64);
        }
    }
}

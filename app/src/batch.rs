//! Natural batching, shared by the run-creation group commit and the batch
//! completer: a consumer takes the first item waiting (waiting for one if
//! none), then every item already queued behind it, up to a cap. No timer: a
//! lone item goes at once, and batches grow only while the previous one is
//! being written (River's completer, PostgreSQL's own group commit).

use tokio::sync::{Mutex, mpsc};

/// The next batch of at most `max` items (≥ 1), or `None` once every sender
/// is gone and the channel is empty. Several consumers may share `rx`: the
/// lock is held only while taking, never while the batch is written.
pub async fn next_batch<T>(rx: &Mutex<mpsc::Receiver<T>>, max: usize) -> Option<Vec<T>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut batch = Vec::with_capacity(max.min(64));
    batch.push(first);
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Every item queued in `rx` now, without waiting: after a batch found the
/// database unreachable, the consumer answers these with the same failure
/// instead of making each wait for it again.
pub async fn waiting<T>(rx: &Mutex<mpsc::Receiver<T>>) -> Vec<T> {
    let mut rx = rx.lock().await;
    let mut items = Vec::new();
    while let Ok(item) = rx.try_recv() {
        items.push(item);
    }
    items
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_takes_what_is_waiting_up_to_the_cap_then_ends_with_the_senders() {
        let (tx, rx) = mpsc::channel(16);
        let rx = Mutex::new(rx);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        assert_eq!(next_batch(&rx, 3).await.unwrap(), [0, 1, 2]);
        assert_eq!(next_batch(&rx, 3).await.unwrap(), [3, 4]);
        drop(tx);
        assert!(next_batch(&rx, 3).await.is_none());
    }

    #[tokio::test]
    async fn waiting_takes_everything_queued_without_waiting() {
        let (tx, rx) = mpsc::channel(16);
        let rx = Mutex::new(rx);
        assert!(waiting(&rx).await.is_empty());
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        assert_eq!(waiting(&rx).await, [0, 1, 2, 3, 4]);
        assert!(waiting(&rx).await.is_empty());
    }
}

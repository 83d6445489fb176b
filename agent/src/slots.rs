//! Job slots: the semaphore behind `[agent] max_concurrent_jobs`, resizable while jobs run.
//!
//! Owns: how many slots exist and growing or shrinking that number on a config reload.
//! Growing takes effect at once. Shrinking takes free slots away at once and the rest as
//! running jobs give theirs back, so no running job is ever stopped to make room.
//!
//! Must not touch: what a slot is used for; the daemon takes one before it receives a
//! message and the job keeps it until its delivery is done.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// A resizable set of job slots.
#[derive(Debug)]
pub struct Slots {
    semaphore: Arc<Semaphore>,
    /// Slots that exist now: free ones plus those held by jobs.
    total: Arc<AtomicUsize>,
    /// The size asked for by the config.
    target: usize,
    /// Takes away slots still held by jobs after a shrink, as they come free.
    shrinking: Option<JoinHandle<()>>,
}

impl Slots {
    pub fn new(size: usize) -> Slots {
        Slots {
            semaphore: Arc::new(Semaphore::new(size)),
            total: Arc::new(AtomicUsize::new(size)),
            target: size,
            shrinking: None,
        }
    }

    /// Waits for a free slot. Cancel-safe; the future holds no borrow of `self`.
    pub fn acquire(&self) -> impl std::future::Future<Output = Option<OwnedSemaphorePermit>> {
        let semaphore = self.semaphore.clone();
        async move { semaphore.acquire_owned().await.ok() }
    }

    /// A free slot, if there is one now.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.semaphore.clone().try_acquire_owned().ok()
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// The configured number of slots.
    pub fn size(&self) -> usize {
        self.target
    }

    /// Changes the number of slots to `size`.
    pub async fn resize(&mut self, size: usize) {
        if let Some(task) = self.shrinking.take() {
            task.abort();
            // An aborted acquire hands back whatever it had taken; a finished one has
            // already counted its slots out of `total`.
            let _ = task.await;
        }
        self.target = size;
        let total = self.total.load(Ordering::SeqCst);
        if size > total {
            self.semaphore.add_permits(size - total);
            self.total.store(size, Ordering::SeqCst);
        } else if size < total {
            let excess = total - size;
            let taken = self.semaphore.forget_permits(excess);
            self.total.fetch_sub(taken, Ordering::SeqCst);
            let rest = excess - taken;
            if rest > 0 {
                let semaphore = self.semaphore.clone();
                let total = self.total.clone();
                let rest_u32 = u32::try_from(rest).unwrap_or(u32::MAX);
                self.shrinking = Some(tokio::spawn(async move {
                    if let Ok(permits) = semaphore.acquire_many_owned(rest_u32).await {
                        permits.forget();
                        total.fetch_sub(rest_u32 as usize, Ordering::SeqCst);
                    }
                }));
            }
        }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        if let Some(task) = self.shrinking.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grows_at_once_and_shrinks_as_jobs_finish() {
        let mut slots = Slots::new(2);
        let a = slots.try_acquire().expect("slot a");
        let b = slots.try_acquire().expect("slot b");
        assert!(slots.try_acquire().is_none());
        slots.resize(3).await;
        assert_eq!(slots.available(), 1);
        let c = slots.try_acquire().expect("slot c");
        // Three held; shrink to one: nothing is free to take now, so it waits for jobs.
        slots.resize(1).await;
        assert_eq!(slots.size(), 1);
        drop(a);
        drop(b);
        // Both returned slots are taken away by the shrink, none becomes free.
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while slots.total.load(Ordering::SeqCst) != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("shrink completes");
        assert_eq!(slots.available(), 0);
        drop(c);
        assert_eq!(slots.available(), 1);
        // A shrink still waiting is replaced by a later resize.
        let d = slots.try_acquire().expect("slot d");
        slots.resize(0).await;
        slots.resize(2).await;
        assert_eq!(slots.available(), 1);
        drop(d);
        assert_eq!(slots.available(), 2);
    }
}

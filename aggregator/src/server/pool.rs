//! Bounded pool of model-sized update buffers.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bounded pool of update buffers: at most `permits` updates are held in
/// memory at once, and buffers are reused across rounds.
pub(super) struct BufferPool {
    pub(super) len: usize,
    pub(super) free: Mutex<Vec<Vec<f32>>>,
    pub(super) permits: Arc<Semaphore>,
}

pub(super) struct PooledBuffer {
    pub(super) buf: Vec<f32>,
    pool: Arc<BufferPool>,
    _permit: OwnedSemaphorePermit,
}

impl BufferPool {
    pub(super) async fn acquire(self: &Arc<Self>) -> Option<PooledBuffer> {
        let permit = Arc::clone(&self.permits).acquire_owned().await.ok()?;
        let buf = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_else(|| vec![0f32; self.len]);
        Some(PooledBuffer {
            buf,
            pool: Arc::clone(self),
            _permit: permit,
        })
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.free.lock() {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

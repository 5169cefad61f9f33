//! What a client accepts from its aggregator. The aggregator is trusted to
//! coordinate, not to own the device: a compromised or buggy one must not
//! be able to make the client allocate gigabytes, train for hours or park
//! forever. Each limit is checked before the work or allocation it guards.

use std::time::Duration;

use thiserror::Error;

/// Limits on an aggregator's demands, with defaults for an edge device
/// (a few hundred MB of memory to spare, minutes of training per round).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientLimits {
    /// Largest model accepted, in parameters. The client holds about four
    /// f32 copies during training (parameters, gradients, the received
    /// global model, optimizer state), so 10M parameters ~ 160-200 MB.
    pub max_params: u64,
    /// Most local epochs one fit task may ask for.
    pub max_epochs: u32,
    /// Largest minibatch one fit task may ask for (activations grow with it).
    pub max_batch_size: u32,
    /// Longest "retry after" honoured; longer requests wait this long.
    pub max_retry_after: Duration,
    /// Most scratch memory training may take, in bytes: activations and their
    /// gradients for a batch ([`fedquic_train::ModelSpec::training_scratch_bytes`]).
    /// A model with few parameters can have huge activations, so this is
    /// checked for the model (one example) and for each task's batch size.
    pub max_training_memory: u64,
    /// Longest the client waits on the aggregator within a task: for a model
    /// stream to open and its header, for the secure-aggregation key exchange
    /// to finish once training is done, for a control message to be taken, and
    /// beyond [`MIN_TRANSFER_RATE`]'s allowance for a model to arrive or an update
    /// to be taken. Past it the session is dropped and the client reconnects.
    pub max_task_wait: Duration,
}

/// Slowest transfer a model download or update upload may run at before
/// [`ClientLimits::transfer_deadline`] gives up on it: 16 KiB/s, a poor
/// cellular uplink.
pub const MIN_TRANSFER_RATE: u64 = 16 * 1024;

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_params: 10_000_000,
            max_epochs: 100,
            max_batch_size: 4096,
            max_retry_after: Duration::from_secs(600),
            max_training_memory: 1 << 30,
            max_task_wait: Duration::from_secs(600),
        }
    }
}

/// An aggregator's demand beyond this client's [`ClientLimits`].
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LimitError {
    #[error(
        "the aggregator's model has {params} parameters, more than this client accepts ({max}; raise --max-params if the device has the memory)"
    )]
    Params { params: u64, max: u64 },
    #[error(
        "the aggregator asked for {epochs} local epochs, more than this client accepts ({max}; --max-epochs)"
    )]
    Epochs { epochs: u32, max: u32 },
    #[error(
        "the aggregator asked for batches of {batch_size}, more than this client accepts ({max}; --max-batch-size)"
    )]
    BatchSize { batch_size: u32, max: u32 },
    #[error(
        "training the aggregator's model on batches of {batch_size} takes {} MiB of scratch memory, more than this client accepts ({} MiB; --max-training-memory)", bytes.div_ceil(1 << 20), max >> 20
    )]
    TrainingMemory {
        bytes: u64,
        batch_size: u32,
        max: u64,
    },
}

impl ClientLimits {
    pub fn check_params(&self, params: u64) -> Result<(), LimitError> {
        if params > self.max_params {
            return Err(LimitError::Params {
                params,
                max: self.max_params,
            });
        }
        Ok(())
    }

    pub fn check_fit(&self, epochs: u32, batch_size: u32) -> Result<(), LimitError> {
        if epochs > self.max_epochs {
            return Err(LimitError::Epochs {
                epochs,
                max: self.max_epochs,
            });
        }
        if batch_size > self.max_batch_size {
            return Err(LimitError::BatchSize {
                batch_size,
                max: self.max_batch_size,
            });
        }
        Ok(())
    }

    /// Refuses a batch whose training scratch memory (`bytes`) exceeds the limit.
    pub fn check_training_memory(&self, bytes: u64, batch_size: u32) -> Result<(), LimitError> {
        if bytes > self.max_training_memory {
            return Err(LimitError::TrainingMemory {
                bytes,
                batch_size,
                max: self.max_training_memory,
            });
        }
        Ok(())
    }

    /// How long a transfer of `bytes` may take: [`ClientLimits::max_task_wait`]
    /// plus the time it takes at [`MIN_TRANSFER_RATE`].
    pub fn transfer_deadline(&self, bytes: u64) -> Duration {
        self.max_task_wait
            .saturating_add(Duration::from_secs(bytes / MIN_TRANSFER_RATE))
    }

    /// The wait for an aggregator's `retry_after_ms`, capped.
    pub fn retry_after(&self, millis: u64) -> Duration {
        let asked = Duration::from_millis(millis);
        if asked > self.max_retry_after {
            tracing::warn!(
                asked_ms = millis,
                capped_ms = self.max_retry_after.as_millis() as u64,
                "the aggregator asked for a longer wait than this client accepts; waiting the maximum"
            );
            self.max_retry_after
        } else {
            asked
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_what_exceeds_them_and_accept_the_rest() {
        let limits = ClientLimits::default();
        limits
            .check_params(199_210)
            .expect("mlp:784-200-200-10 fits");
        let err = limits
            .check_params(2_000_000_000)
            .expect_err("2e9 parameters");
        assert!(err.to_string().contains("2000000000 parameters"), "{err}");
        limits.check_fit(5, 64).expect("ordinary task");
        assert!(matches!(
            limits.check_fit(10_000, 10),
            Err(LimitError::Epochs { epochs: 10_000, .. })
        ));
        assert!(matches!(
            limits.check_fit(1, 1 << 20),
            Err(LimitError::BatchSize { .. })
        ));
        limits
            .check_training_memory(25_849_344, 64)
            .expect("cnn:mnist at batch 64");
        let err = limits
            .check_training_memory(20 << 30, 32)
            .expect_err("20 GiB");
        assert!(err.to_string().contains("--max-training-memory"), "{err}");
        assert_eq!(
            limits.transfer_deadline(64 << 20),
            Duration::from_secs(600 + 4096)
        );
        assert_eq!(
            limits.transfer_deadline(u64::MAX),
            Duration::from_secs(600 + u64::MAX / 16384)
        );
        assert_eq!(limits.retry_after(250), Duration::from_millis(250));
        assert_eq!(limits.retry_after(u64::MAX), Duration::from_secs(600));
    }
}

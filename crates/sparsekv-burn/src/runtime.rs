//! Noticing that a GPU runtime's device thread has failed.
//!
//! CubeCL runs each device's work on threads of its own. When one of them panics (an
//! allocation or launch failure nobody foresaw), the caller's thread does not notice: its
//! buffers are dead and what it reads back is garbage. [`watch_device_threads`] installs, once
//! per process, a panic hook that records such a panic (and then runs the hook that was there
//! before, so messages and the program's own hooks are unchanged); [`check_device_threads`]
//! turns the record into [`KvCacheError::DeviceThread`]. The caches call both, so their
//! operations return that error from the first call after the failure instead of computing
//! with dead buffers.

use std::sync::{Once, OnceLock};

use crate::error::{KvCacheError, Result};

/// The first device-thread failure of the process: thread name and panic message.
static FAILURE: OnceLock<String> = OnceLock::new();
/// The first failure of an operation that ran after its call returned (queued on a fusion
/// stream): the operation and its error.
static QUEUED_FAILURE: OnceLock<String> = OnceLock::new();
static WATCH: Once = Once::new();

/// Whether `name` is a CubeCL device thread: cubecl-common 0.10 names them `DSU-<type>-<index>`
/// (upstream) and `DSD-<type>-<index>` (downstream).
fn is_device_thread(name: &str) -> bool {
    name.starts_with("DSU-") || name.starts_with("DSD-")
}

/// Installs the panic hook that records a device thread's panic, once per process (later calls
/// do nothing). The caches call it when they are created; a program may call it earlier.
pub fn watch_device_threads() {
    WATCH.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if let Some(name) = thread.name().filter(|n| is_device_thread(n)) {
                let payload = info.payload();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                let _ = FAILURE.set(format!("{name}: {message}"));
            }
            previous(info);
        }));
    });
}

/// Records that the queued operation `operation` failed when it ran (a fused backend runs an
/// operation after its call returned, so the error has no caller to go to). The first such
/// failure is kept; [`check_device_threads`] reports it.
pub(crate) fn record_queued_failure(operation: &str, error: &KvCacheError) {
    let _ = QUEUED_FAILURE.set(format!("{operation}: {error}"));
}

/// `Ok` while no device thread has failed since [`watch_device_threads`] was installed and no
/// queued operation has failed, else [`KvCacheError::DeviceThread`] with the first failure's
/// thread and message, or [`KvCacheError::QueuedOperation`] with the operation and its error.
pub fn check_device_threads() -> Result<()> {
    if let Some(failure) = FAILURE.get() {
        return Err(KvCacheError::DeviceThread(failure.clone()));
    }
    match QUEUED_FAILURE.get() {
        Some(failure) => Err(KvCacheError::QueuedOperation(failure.clone())),
        None => Ok(()),
    }
}

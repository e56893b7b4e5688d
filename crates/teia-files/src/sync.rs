//! The crate's one poison-recovering lock.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, recovering it if a task panicked while holding it (every critical
/// section leaves its state consistent).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

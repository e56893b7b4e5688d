//! The crate's one way to take a lock: a lock whose holder panicked is taken anyway (the
//! state it guards is kept consistent between statements, so the node goes on serving).
//!
//! **Bounds**: none of its own; a lock is held only for the statements between taking it
//! and dropping the guard, never across an await.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, recovering it when a holder panicked.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

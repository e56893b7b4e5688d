//! The one way teia's runtimes take a `std` lock: a lock whose holder panicked is taken
//! anyway (each critical section leaves the state it guards consistent between statements,
//! so the node goes on serving everyone else).
//!
//! **Bounds**: none of its own; a lock is held only for the statements between taking it
//! and dropping the guard, never across an await.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, recovering it when a holder panicked.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

//! Values set a few times in the proxy's life and read by every request: readiness and the
//! shutdown phase ([`super::Lifecycle`]).
//!
//! A watch channel's `borrow` takes a read lock, and a read lock's counter is written by every
//! reader, so on the request path it is a cache line moving between cores for a value that
//! changes once. A [`Signal`] keeps the value in an atomic, so a read is a plain load, and a
//! watch channel of change notices beside it for the few tasks that wait for a change.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// A value a [`Signal`] can hold: one that fits a byte.
pub trait SignalValue: Copy + Send + Sync + 'static {
    fn to_byte(self) -> u8;
    fn from_byte(byte: u8) -> Self;
}

impl SignalValue for bool {
    fn to_byte(self) -> u8 {
        u8::from(self)
    }

    fn from_byte(byte: u8) -> Self {
        byte != 0
    }
}

/// A shared value: cheap to read from any thread, and awaitable when it changes. Clones share
/// the value.
pub struct Signal<T> {
    shared: Arc<Shared>,
    _value: PhantomData<fn() -> T>,
}

struct Shared {
    value: AtomicU8,
    /// Sent after every change. The sender lives as long as any handle, so it never closes.
    changed: watch::Sender<()>,
}

impl<T> Clone for Signal<T> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone(), _value: PhantomData }
    }
}

impl<T: SignalValue> Signal<T> {
    pub fn new(initial: T) -> Self {
        let shared = Shared { value: AtomicU8::new(initial.to_byte()), changed: watch::channel(()).0 };
        Self { shared: Arc::new(shared), _value: PhantomData }
    }

    /// The value now.
    pub fn get(&self) -> T {
        T::from_byte(self.shared.value.load(Ordering::Acquire))
    }

    pub fn set(&self, value: T) {
        self.shared.value.store(value.to_byte(), Ordering::Release);
        self.shared.changed.send_replace(());
    }

    /// Resolves with the value once `wanted` accepts it (at once if it does already).
    pub async fn wait_for(&self, wanted: impl Fn(T) -> bool) -> T {
        // Subscribed before reading, so a change between the read and the wait is not missed.
        let mut changed = self.shared.changed.subscribe();
        loop {
            let value = self.get();
            if wanted(value) {
                return value;
            }
            // Cannot fail: `self` holds the sender.
            let _ = changed.changed().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_sees_a_change_made_after_it_started_waiting() {
        let signal = Signal::new(false);
        let waiter = tokio::spawn({
            let signal = signal.clone();
            async move { signal.wait_for(|ready| ready).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        signal.set(true);
        assert!(tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await.unwrap().unwrap());
        assert!(signal.get());
        // Already true: resolves at once.
        assert!(signal.wait_for(|ready| ready).await);
    }
}

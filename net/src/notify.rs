//! A wake-up flag for one waiting task on the same thread.
//!
//! Signals coalesce: any number of [`Notify::notify`] calls before the waiter runs wake it once.
//! That is what a connection's writer wants — "there is output" — and it needs no lock or atomic.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Notify {
    flag: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Completes once a notification arrived since the last completion.
    pub async fn notified(&self) {
        poll_fn(|cx| self.poll_notified(cx)).await
    }

    /// [`Notify::notified`] for hand-written futures that wait on several things at once.
    pub fn poll_notified(&self, cx: &Context<'_>) -> Poll<()> {
        if self.flag.replace(false) {
            Poll::Ready(())
        } else {
            let mut w = self.waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
            Poll::Pending
        }
    }
}

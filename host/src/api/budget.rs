//! The node-wide budget for bytes of requests received in part, over every HTTP, QUIC and Redis
//! protocol connection (as Redis bounds its clients' query buffers with `maxmemory-clients`).
//!
//! Per-connection limits alone do not bound a node: 1,024 Redis connections each holding most
//! of a 33 MiB request would hold 32 GiB. So every request being received holds a [`Claim`] on
//! the budget for what it has buffered beyond [`FREE_BYTES`]; the claim grows as bytes arrive and
//! is given back when the request is whole (or abandoned). A request that would take the node over
//! its budget is refused (`overloaded`, safe to retry) and its connection or stream closed, unless
//! it is the only one holding any (so a module upload larger than the budget still gets in, one at
//! a time): the memory of half-read requests stays under the larger of the budget and one request's
//! limit however many clients send at once. The budget is a share of the node's memory budget
//! ([`NodeConfig::request_buffer_bytes_max`](crate::config::NodeConfig::request_buffer_bytes_max)).
//! Small requests never touch the budget: they are bounded by the connection limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{ErrorCode, RemoteError, error};

/// Bytes of one request that need no claim: every ordinary request fits.
pub const FREE_BYTES: usize = 64 << 10;

/// Bytes claimed out of a maximum.
#[derive(Debug)]
pub struct ReadBudget {
    used: AtomicUsize,
    max: usize,
}

impl ReadBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<ReadBudget> {
        Arc::new(ReadBudget { used: AtomicUsize::new(0), max })
    }

    /// A claim of nothing yet, for one request.
    pub fn claim(self: &Arc<Self>) -> Claim {
        Claim { budget: self.clone(), held: 0 }
    }

    /// Holds `bytes` of a whole request kept in memory until it is answered (a pipelined
    /// command), or `None` if that would take the node over its budget: the caller then waits
    /// for room rather than refusing.
    pub fn hold(self: &Arc<Self>, bytes: usize) -> Option<Claim> {
        let max = self.max;
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| (used + bytes <= max).then_some(used + bytes))
            .ok()?;
        Some(Claim { budget: self.clone(), held: bytes })
    }

    /// Holds `bytes` of a whole request kept until it is answered if they fit beside what is
    /// held, or alone when nothing is (so a request larger than the budget is not refused for
    /// ever); `None` otherwise.
    pub fn admit(self: &Arc<Self>, bytes: usize) -> Option<Claim> {
        let max = self.max;
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used == 0 || used + bytes <= max).then_some(used + bytes)
            })
            .ok()?;
        Some(Claim { budget: self.clone(), held: bytes })
    }

    /// The budget's size.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes claimed now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// One request's share of the budget; given back on drop.
#[derive(Debug)]
pub struct Claim {
    budget: Arc<ReadBudget>,
    held: usize,
}

impl Claim {
    /// Accounts for the request having `buffered` bytes: holds what is over [`FREE_BYTES`], or
    /// refuses (holding what it held before) if that would take the node over its budget while
    /// other requests hold some of it.
    pub fn set(&mut self, buffered: usize) -> Result<(), RemoteError> {
        let want = buffered.saturating_sub(FREE_BYTES);
        if want == self.held {
            // The common case (a small request, or no change): the shared counter is untouched.
            return Ok(());
        }
        if want < self.held {
            self.budget.used.fetch_sub(self.held - want, Ordering::Relaxed);
            self.held = want;
            return Ok(());
        }
        let (more, held) = (want - self.held, self.held);
        let max = self.budget.max;
        self.budget
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used == held || used + more <= max).then_some(used + more)
            })
            .map_err(|_| {
                error(
                    ErrorCode::Overloaded,
                    format!(
                        "the node is already receiving {} MiB of large requests, its limit \
                         (--request-buffer-mib, by default 1/16 of --node-memory-mib); retry shortly, or \
                         send large requests one at a time",
                        max >> 20
                    ),
                )
            })?;
        self.held = want;
        Ok(())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_share_the_budget_and_give_it_back() {
        let budget = ReadBudget::new(1 << 20);
        let mut a = budget.claim();
        let mut b = budget.claim();
        a.set(FREE_BYTES).unwrap();
        assert_eq!(budget.used(), 0, "small requests are free");
        a.set(FREE_BYTES + (768 << 10)).unwrap();
        let refused = b.set(FREE_BYTES + (512 << 10)).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Overloaded);
        assert!(refused.message.contains("--request-buffer-mib"), "{}", refused.message);
        b.set(FREE_BYTES + (256 << 10)).unwrap();
        assert_eq!(budget.used(), 1 << 20);
        a.set(0).unwrap();
        assert_eq!(budget.used(), 256 << 10);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_request_alone_may_pass_the_budget_and_holds_off_the_others_meanwhile() {
        let budget = ReadBudget::new(1 << 20);
        let mut upload = budget.claim();
        upload.set(FREE_BYTES + (3 << 20)).expect("alone, a request larger than the budget gets in");
        assert_eq!(budget.used(), 3 << 20);
        let mut other = budget.claim();
        other.set(FREE_BYTES).unwrap();
        let refused = other.set(FREE_BYTES + 1).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Overloaded);
        assert_eq!(budget.used(), 3 << 20, "the refused request holds nothing");
        drop(upload);
        other.set(FREE_BYTES + (1 << 20)).expect("fits once the large one is done");
        let mut third = budget.claim();
        third.set(FREE_BYTES + (2 << 20)).unwrap_err();
        assert_eq!(budget.used(), 1 << 20);
    }

    #[test]
    fn holds_take_whole_requests_and_only_while_they_fit() {
        let budget = ReadBudget::new(1000);
        let a = budget.hold(600).expect("fits");
        assert!(budget.hold(600).is_none(), "over the budget");
        let b = budget.hold(400).expect("fits beside the first");
        assert_eq!(budget.used(), 1000);
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}

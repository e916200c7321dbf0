//! Confirming a flock's lead before a job that changed nothing is answered (Raft's read index,
//! §6.4 of the Raft thesis), with the rounds of one flock shared by every job that waits.
//!
//! A job that wrote something proves its leader's lead when its change set commits in that
//! leader's term. A job that wrote nothing proves nothing: a leader cut off from the others (a
//! pause, a partition, a restart faster than its peers noticed) may meanwhile have been replaced,
//! and the new leader may have committed changes it never saw. So such a job is answered only
//! once a majority of the flock's voters has answered a heartbeat sent *after* the job ran, in the
//! term the job ran in.
//!
//! One round per flock is in flight at a time; jobs that finish while it is under way wait for
//! the next one, which starts after they ran. Under load many reads share one round trip.

use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::oneshot;

use super::raft::Raft;
use crate::error::{ErrorCode, RemoteError, Result, error};

/// Per flock, the jobs waiting for the next confirmation round.
pub struct ReadRounds {
    slots: Vec<Mutex<Slot>>,
}

#[derive(Default)]
struct Slot {
    /// A round is under way (its driver task runs).
    running: bool,
    /// Jobs that ran before the next round starts: each wants the lead confirmed in its term.
    waiting: Vec<(u64, oneshot::Sender<Result<()>>)>,
}

impl ReadRounds {
    /// No rounds for `flocks` flocks.
    pub fn new(flocks: u32) -> Self {
        ReadRounds { slots: (0..flocks).map(|_| Mutex::default()).collect() }
    }

    /// Resolves once a round that started after this call has confirmed that this node leads
    /// `flock` in `term` (the term the job ran in).
    pub fn confirm(self: &Arc<Self>, raft: &Raft, flock: u32, term: u64) -> BoxFuture<'static, Result<()>> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut slot = self.slot(flock);
            slot.waiting.push((term, tx));
            !std::mem::replace(&mut slot.running, true)
        };
        if start {
            tokio::spawn(self.clone().drive(raft.clone(), flock));
        }
        async move { rx.await.unwrap_or_else(|_| Err(not_confirmed(flock, "the node is stopping"))) }.boxed()
    }

    fn slot(&self, flock: u32) -> std::sync::MutexGuard<'_, Slot> {
        self.slots[flock as usize].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs rounds until no job waits.
    async fn drive(self: Arc<Self>, raft: Raft, flock: u32) {
        loop {
            let waiting = {
                let mut slot = self.slot(flock);
                if slot.waiting.is_empty() {
                    slot.running = false;
                    return;
                }
                std::mem::take(&mut slot.waiting)
            };
            // The term after a successful check is the term it was made in: terms only grow.
            let confirmed = match raft.get_read_log_id().await {
                Ok(_) => Ok(raft.metrics().borrow().current_term),
                Err(e) => Err(e.to_string()),
            };
            for (term, tx) in waiting {
                let answer = match &confirmed {
                    Ok(now) if *now == term => Ok(()),
                    Ok(now) => Err(not_confirmed(flock, &format!("the lead moved from term {term} to {now}"))),
                    Err(e) => Err(not_confirmed(flock, e)),
                };
                let _ = tx.send(answer);
            }
        }
    }
}

fn not_confirmed(flock: u32, why: &str) -> RemoteError {
    error(
        ErrorCode::Unavailable,
        format!(
            "this node could not confirm that it still leads flock {flock} ({why}); the job changed nothing, so \
             retry (another node may lead it now)"
        ),
    )
}

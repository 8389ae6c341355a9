//! The mounts' lifecycle as one state machine, as nydus drives its FUSE
//! daemon (`service/src/daemon.rs`): where the broker's FUSE side is,
//! and the only place it moves.
//!
//! ```text
//!            quiesce                 handed_over
//!  Serving ───────────▶ Quiescing ───────────────▶ HandedOver
//!     ▲                   │  │
//!     └────── resume ─────┘  │ shutdown
//!     │                      ▼
//!     └───── shutdown ────▶ Stopping
//! ```
//!
//! - **Serving**: the workers take requests and changes reach the mounts.
//! - **Quiescing**: a handover is under way: no request is taken (they
//!   queue in the kernel for the successor), no change is applied (the
//!   successor syncs from the store), the parked requests are answered.
//!   It ends in `HandedOver`, or back in `Serving` if the handover failed.
//! - **HandedOver**: a successor serves the mounts; this process only
//!   exits (without unmounting). Final.
//! - **Stopping**: a clean shutdown; the workers end. Final.
//!
//! Every other move is refused ([`LifecycleError::Illegal`]) and changes
//! nothing. The state is also published (a `watch`), so a waiter can
//! follow it.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::watch;

/// Where the mounts are in their life (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Serving,
    Quiescing,
    HandedOver,
    Stopping,
}

impl State {
    /// Whether changes of the store reach the mounts now.
    pub fn applies_changes(self) -> bool {
        self == State::Serving
    }

    /// Whether the FUSE workers take requests now.
    pub fn takes_requests(self) -> bool {
        self == State::Serving
    }

    /// Whether the workers must end (for good).
    pub fn ends_workers(self) -> bool {
        self == State::Stopping
    }

    /// Whether `self` → `to` is a move of the lifecycle. The one table.
    pub fn may_become(self, to: State) -> bool {
        use State::*;
        matches!(
            (self, to),
            (Serving, Quiescing) | (Quiescing, Serving) | (Quiescing, HandedOver) | (Serving | Quiescing, Stopping)
        )
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Serving => "serving",
            State::Quiescing => "quiescing",
            State::HandedOver => "handed over",
            State::Stopping => "stopping",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LifecycleError {
    #[error("the mounts cannot go from {from} to {to}")]
    Illegal { from: State, to: State },
}

impl State {
    const ALL: [State; 4] = [State::Serving, State::Quiescing, State::HandedOver, State::Stopping];
}

/// The current [`State`]; moves only through [`Lifecycle::go`].
#[derive(Debug)]
pub struct Lifecycle {
    state: watch::Sender<State>,
    /// The same state for the workers' per-request check (no lock).
    now: AtomicU8,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle { state: watch::Sender::new(State::Serving), now: AtomicU8::new(State::Serving as u8) }
    }
}

impl Lifecycle {
    pub fn state(&self) -> State {
        State::ALL[usize::from(self.now.load(Ordering::Acquire))]
    }

    /// Follow the state.
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    /// Move to `to` if the table allows it (atomically: two racing moves
    /// cannot both start from the same state). Returns the state left.
    pub fn go(&self, to: State) -> Result<State, LifecycleError> {
        let mut from = None;
        self.state.send_if_modified(|s| {
            from = Some(*s);
            let ok = s.may_become(to);
            if ok {
                *s = to;
                self.now.store(to as u8, Ordering::Release);
            }
            ok
        });
        // The closure always runs: `from` is set.
        let from = from.unwrap_or(to);
        if from.may_become(to) { Ok(from) } else { Err(LifecycleError::Illegal { from, to }) }
    }
}

#[cfg(test)]
mod tests {
    use super::State::*;
    use super::*;

    const ALL: [State; 4] = State::ALL;

    #[test]
    fn only_the_documented_moves_are_allowed() {
        let allowed = [
            (Serving, Quiescing),
            (Quiescing, Serving),
            (Quiescing, HandedOver),
            (Serving, Stopping),
            (Quiescing, Stopping),
        ];
        for from in ALL {
            for to in ALL {
                assert_eq!(from.may_become(to), allowed.contains(&(from, to)), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn handed_over_and_stopping_are_final() {
        for end in [HandedOver, Stopping] {
            assert!(ALL.iter().all(|to| !end.may_become(*to)), "{end} is final");
        }
    }

    #[test]
    fn a_refused_move_changes_nothing_and_says_why() {
        let l = Lifecycle::default();
        assert_eq!(l.state(), Serving);
        assert_eq!(l.go(HandedOver), Err(LifecycleError::Illegal { from: Serving, to: HandedOver }));
        assert_eq!(l.state(), Serving);
        assert_eq!(l.go(Serving), Err(LifecycleError::Illegal { from: Serving, to: Serving }));
        assert_eq!(
            LifecycleError::Illegal { from: Serving, to: HandedOver }.to_string(),
            "the mounts cannot go from serving to handed over"
        );
    }

    #[test]
    fn a_failed_handover_serves_again_and_a_good_one_is_final() {
        let l = Lifecycle::default();
        let mut seen = l.subscribe();
        assert_eq!(l.go(Quiescing), Ok(Serving));
        assert!(seen.has_changed().unwrap());
        assert_eq!(*seen.borrow_and_update(), Quiescing);
        assert!(!l.state().applies_changes() && !l.state().takes_requests());
        assert_eq!(l.go(Serving), Ok(Quiescing));
        assert!(l.state().applies_changes() && l.state().takes_requests());
        assert_eq!(l.go(Quiescing), Ok(Serving));
        assert_eq!(l.go(HandedOver), Ok(Quiescing));
        for to in ALL {
            assert!(l.go(to).is_err(), "nothing after a handover: {to}");
        }
        assert_eq!(l.state(), HandedOver);
    }

    #[test]
    fn shutdown_from_serving_or_mid_handover_ends_the_workers() {
        for path in [&[Stopping][..], &[Quiescing, Stopping][..]] {
            let l = Lifecycle::default();
            for s in path {
                l.go(*s).unwrap();
            }
            assert!(l.state().ends_workers());
            assert!(l.go(Serving).is_err() && l.go(Quiescing).is_err());
        }
    }
}

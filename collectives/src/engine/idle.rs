//! What a rank does when a pump moved nothing: spin briefly, then yield its
//! core, then sleep in `poll` until a link can move, and give up at the
//! deadline. Time is passed in, so the policy is tested without a clock.

use std::time::{Duration, Instant};

/// How long an idle engine spins on the CPU alone before it starts yielding
/// the core to other threads between checks, where the host has a CPU for
/// each rank (with more ranks than CPUs over shared memory it yields at
/// once: the rank it waits for may be the one waiting for its core).
const PAUSE_SPIN: Duration = Duration::from_micros(2);

/// The next thing an idle rank does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Pause the CPU this many times, then check the links again.
    Pause(u32),
    /// Let another thread run, then check again.
    Yield,
    /// Sleep until a link can move, at most this long.
    Sleep(Duration),
    /// Nothing moved for this long, the whole timeout: give up.
    TimedOut(Duration),
}

/// The idle policy of one call: `spin` of busy-polling, then sleeping, and
/// `timeout` without progress in all.
#[derive(Debug)]
pub(super) struct Idle {
    spin: Duration,
    /// The first part of `spin`, paused on the CPU without yielding.
    pause: Duration,
    timeout: Duration,
    pauses_per_check: u32,
    /// When the current stretch without progress began. Set at the first
    /// check that moves nothing, so a call whose bytes are already there
    /// reads no clock at all.
    since: Option<Instant>,
}

impl Idle {
    /// `cheap`: both links are checked by a memory load (shared memory), so
    /// they are checked after every pause; sockets, whose checks are system
    /// calls that contend with the kernel's delivery into the same socket,
    /// after 64. `crowded`: this host has more of the job's ranks than CPUs,
    /// so with cheap checks the rank yields from the first idle check.
    pub(super) fn new(spin: Duration, timeout: Duration, cheap: bool, crowded: bool) -> Idle {
        Idle {
            spin,
            pause: if cheap && crowded {
                Duration::ZERO
            } else {
                PAUSE_SPIN
            },
            timeout,
            pauses_per_check: if cheap { 1 } else { 64 },
            since: None,
        }
    }

    /// Something moved: the next idle stretch starts afresh.
    #[inline]
    pub(super) fn reset(&mut self) {
        self.since = None;
    }

    /// What to do at `now`, after a pump that moved nothing.
    #[inline]
    pub(super) fn next(&mut self, now: Instant) -> Step {
        let idle = now.saturating_duration_since(*self.since.get_or_insert(now));
        if idle < self.spin {
            // Shared memory delivers in well under a microsecond: a system
            // call per check would cost more than the wait. A pause takes
            // tens to hundreds of cycles (65 on AMD Zen 2, 140 on Intel
            // Skylake). Past the first microseconds (at once where ranks
            // outnumber CPUs), let another rank on this core run.
            return if idle < self.pause {
                Step::Pause(self.pauses_per_check)
            } else {
                Step::Yield
            };
        }
        if idle >= self.timeout {
            Step::TimedOut(idle)
        } else {
            Step::Sleep(self.timeout - idle)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn spins_then_yields_then_sleeps_then_gives_up() {
        let t0 = Instant::now();
        let mut idle = Idle::new(200 * US, Duration::from_secs(1), false, false);
        assert_eq!(idle.next(t0), Step::Pause(64));
        assert_eq!(idle.next(t0 + US), Step::Pause(64));
        assert_eq!(idle.next(t0 + 3 * US), Step::Yield);
        assert_eq!(idle.next(t0 + 199 * US), Step::Yield);
        assert_eq!(
            idle.next(t0 + 200 * US),
            Step::Sleep(Duration::from_secs(1) - 200 * US)
        );
        let late = t0 + Duration::from_millis(1500);
        assert_eq!(idle.next(late), Step::TimedOut(Duration::from_millis(1500)));
    }

    /// More ranks than CPUs: over shared memory the first idle check
    /// yields (the awaited rank may need this core); sockets, whose checks
    /// are system calls, still pause first.
    #[test]
    fn crowded_cheap_links_yield_from_the_first_check() {
        let t0 = Instant::now();
        let mut idle = Idle::new(200 * US, Duration::from_secs(1), true, true);
        assert_eq!(idle.next(t0), Step::Yield);
        assert_eq!(idle.next(t0 + US), Step::Yield);
        assert!(matches!(idle.next(t0 + 200 * US), Step::Sleep(_)));
        let mut sockets = Idle::new(200 * US, Duration::from_secs(1), false, true);
        assert_eq!(sockets.next(t0), Step::Pause(64));
        assert_eq!(sockets.next(t0 + 3 * US), Step::Yield);
        let mut roomy = Idle::new(200 * US, Duration::from_secs(1), true, false);
        assert_eq!(roomy.next(t0), Step::Pause(1));
        assert_eq!(roomy.next(t0 + 3 * US), Step::Yield);
    }

    #[test]
    fn progress_restarts_the_stretch() {
        let t0 = Instant::now();
        let mut idle = Idle::new(10 * US, Duration::from_millis(5), true, false);
        assert_eq!(idle.next(t0), Step::Pause(1));
        assert!(matches!(
            idle.next(t0 + Duration::from_millis(4)),
            Step::Sleep(_)
        ));
        idle.reset();
        let t1 = t0 + Duration::from_millis(6);
        assert_eq!(
            idle.next(t1),
            Step::Pause(1),
            "a new stretch, not a timeout"
        );
        assert_eq!(
            idle.next(t1 + Duration::from_millis(5)),
            Step::TimedOut(Duration::from_millis(5))
        );
    }

    #[test]
    fn no_spin_sleeps_at_once_and_a_clock_going_back_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut idle = Idle::new(Duration::ZERO, Duration::from_secs(2), false, true);
        assert_eq!(idle.next(t0), Step::Sleep(Duration::from_secs(2)));
        assert_eq!(
            idle.next(t0 - Duration::from_millis(10)),
            Step::Sleep(Duration::from_secs(2))
        );
    }
}

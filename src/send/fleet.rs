//! When a ship over several destinations ends, and how (issue #12's run rules, no I/O): each
//! destination's phase goes in, the run's verdict comes out. With one destination these are the
//! single-receiver rules of before: a fatal refusal fails the run, `--once` ends when the receiver
//! holds the end of valid WAL, a shutdown ends when the drain is done.

/// Where one destination stands, as far as the run's end is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting to reconnect, connecting, or handshaking.
    Connecting,
    Streaming,
    /// Holds everything up to the final horizon (or, live, the drain's horizon) durably.
    Done,
    /// Holds this timeline up to its switch point; waits for the others to get there.
    WaitSwitch,
    /// Holds every valid byte before the source's damage.
    Corrupt,
    /// Left behind by a shutdown (drain timed out, or it was not connected).
    Interrupted,
    /// Refused fatally, or ran out of `--retry-for`: this run will not use it again.
    Failed,
}

/// What the run does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Every destination still in the run holds this timeline up to its switch point.
    Switch,
    Finish(Finish),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Every destination holds the end (exit 0).
    All,
    /// At least K destinations hold the end, some do not (its own exit code).
    QuorumOnly,
    /// Fewer than K destinations can still hold the end: fail with a failed destination's error.
    Short,
    /// The destinations hold every valid byte before the source's damage: report the damage.
    Corrupt,
    /// A shutdown left fewer than K destinations done.
    Interrupted,
}

/// The run's verdict over `phases` with quorum `k`; `shutting_down` once SIGTERM arrived.
pub fn verdict(phases: &[Phase], k: usize, shutting_down: bool) -> Verdict {
    assert!(k >= 1 && k <= phases.len(), "quorum {k} of {}", phases.len());
    let count = |p: Phase| phases.iter().filter(|&&q| q == p).count();
    if phases.len() - count(Phase::Failed) < k {
        return Verdict::Finish(Finish::Short);
    }
    if count(Phase::Connecting) + count(Phase::Streaming) > 0 {
        return Verdict::Continue;
    }
    let done = count(Phase::Done);
    if !shutting_down {
        if count(Phase::WaitSwitch) > 0 {
            return Verdict::Switch;
        }
        if count(Phase::Corrupt) > 0 {
            return Verdict::Finish(Finish::Corrupt);
        }
    }
    Verdict::Finish(if done == phases.len() {
        Finish::All
    } else if done >= k {
        Finish::QuorumOnly
    } else if shutting_down {
        Finish::Interrupted
    } else {
        Finish::Short
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Phase::*;

    #[test]
    fn one_destination_keeps_the_single_receiver_rules() {
        assert_eq!(verdict(&[Streaming], 1, false), Verdict::Continue);
        assert_eq!(verdict(&[Connecting], 1, true), Verdict::Continue);
        assert_eq!(verdict(&[Done], 1, false), Verdict::Finish(Finish::All));
        assert_eq!(verdict(&[Done], 1, true), Verdict::Finish(Finish::All));
        assert_eq!(verdict(&[Failed], 1, false), Verdict::Finish(Finish::Short));
        assert_eq!(verdict(&[Interrupted], 1, true), Verdict::Finish(Finish::Interrupted));
        assert_eq!(verdict(&[WaitSwitch], 1, false), Verdict::Switch);
        assert_eq!(verdict(&[Corrupt], 1, false), Verdict::Finish(Finish::Corrupt));
    }

    #[test]
    fn two_of_three() {
        assert_eq!(verdict(&[Done, Done, Connecting], 2, false), Verdict::Continue, "the third still has --retry-for");
        assert_eq!(verdict(&[Done, Done, Failed], 2, false), Verdict::Finish(Finish::QuorumOnly));
        assert_eq!(verdict(&[Streaming, Failed, Failed], 2, false), Verdict::Finish(Finish::Short), "fails at once");
        assert_eq!(verdict(&[WaitSwitch, WaitSwitch, Connecting], 2, false), Verdict::Continue);
        assert_eq!(verdict(&[WaitSwitch, WaitSwitch, Failed], 2, false), Verdict::Switch);
        assert_eq!(verdict(&[Done, Interrupted, Interrupted], 2, true), Verdict::Finish(Finish::Interrupted));
        assert_eq!(verdict(&[Done, Done, Interrupted], 2, true), Verdict::Finish(Finish::QuorumOnly));
    }

    fn phase() -> impl Strategy<Value = Phase> {
        prop_oneof![
            Just(Connecting),
            Just(Streaming),
            Just(Done),
            Just(WaitSwitch),
            Just(Corrupt),
            Just(Interrupted),
            Just(Failed)
        ]
    }

    proptest! {
        /// The run never ends "all" or "quorum" with fewer than K done, never waits on nobody,
        /// and fails as soon as fewer than K destinations remain.
        #[test]
        fn verdicts_respect_the_quorum(phases in prop::collection::vec(phase(), 1..6), k in 1usize..6, shutting_down: bool) {
            prop_assume!(k <= phases.len());
            let done = phases.iter().filter(|&&p| p == Done).count();
            let failed = phases.iter().filter(|&&p| p == Failed).count();
            let active = phases.iter().filter(|&&p| matches!(p, Connecting | Streaming)).count();
            match verdict(&phases, k, shutting_down) {
                Verdict::Continue => prop_assert!(active > 0 && phases.len() - failed >= k),
                Verdict::Switch => prop_assert!(active == 0 && !shutting_down),
                Verdict::Finish(Finish::All) => prop_assert_eq!(done, phases.len()),
                Verdict::Finish(Finish::QuorumOnly) => prop_assert!(done >= k && done < phases.len()),
                Verdict::Finish(_) => prop_assert!(done < k || phases.len() - failed < k || phases.contains(&Corrupt)),
            }
            if phases.len() - failed < k {
                prop_assert_eq!(verdict(&phases, k, shutting_down), Verdict::Finish(Finish::Short));
            }
        }
    }
}

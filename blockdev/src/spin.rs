//! How long the serve loop polls before it sleeps (`RING.md`, "Doorbells").
//!
//! A spin that work ends saves a wake-up (tens of µs of latency on a VM); a spin that
//! expires is CPU taken from the client and the kernel, which on a small machine slows the
//! very work the driver waits for. [`SpinMode::Fixed`] always spins the configured
//! maximum; [`SpinMode::Adaptive`] keeps a budget per kind of wait ([`Wait`]) and learns
//! from each idle period whether spinning paid ([`SpinBudget`]). This is policy only: the
//! loop announces its sleep and re-checks the queue exactly as before, whatever the spin.

use std::time::Duration;

/// Whether the spin is fixed or learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpinMode {
    /// Always spin the maximum.
    Fixed,
    /// Spin a budget between 0 and the maximum, learned per [`Wait`].
    #[default]
    Adaptive,
}

impl std::str::FromStr for SpinMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fixed" => Ok(SpinMode::Fixed),
            "adaptive" => Ok(SpinMode::Adaptive),
            other => Err(format!(
                "unknown spin mode {other:?} (expected adaptive or fixed)"
            )),
        }
    }
}

impl SpinMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SpinMode::Fixed => "fixed",
            SpinMode::Adaptive => "adaptive",
        }
    }
}

/// What an idle driver waits for. Each has its own budget: the device's latency and the
/// client's time between requests are unrelated (e.g. a 4 KiB write completes in 25–60 µs
/// whatever the workload, while a synchronous stream sends its next request 40–50 µs
/// after the last completion and a small-file create loop 150 µs or more after).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Requests are in flight at the engine: the next event is most likely a completion.
    Device,
    /// Nothing is in flight: the next event is a request (or the client reaping).
    Client,
}

/// Allowance for a wake-up's latency when judging a sleep: an idle period that ended
/// within `max + WAKE_ALLOWANCE` of its start (spin, sleep and wake-up together) may have
/// been one a spin of `max` would have caught. Two wake-ups cost about 45 µs each on the
/// 2-vCPU VM of `docs/BENCHMARKS.md`; this rounds that up.
pub const WAKE_ALLOWANCE: Duration = Duration::from_micros(50);

/// After the `n`th failed probe in a row, no probe for the next `2^n` idle periods (n at
/// most this): a workload whose gaps are just too long costs a probe per 64 periods.
const MAX_PROBE_BACKOFF: u32 = 6;

/// One learned spin budget, in `[0, max]`; starts at `max`. Pure and deterministic: the
/// loop measures each idle period (from its last progress to its next) and reports it
/// with [`SpinBudget::record`]. Only a spin tells for sure whether spinning pays (a
/// sleep's length includes the wake-up), so:
///
/// - Work arrived during the spin: the spin paid. The budget keeps at least twice that
///   gap (it never shrinks here), so a stream of short gaps keeps spinning.
/// - The spin expired and the driver slept: the spin was wasted. The budget halves, and
///   drops to 0 once below `max / 8`: sporadic requests cost four shrinking spins, then
///   none.
/// - If that sleep was short (the work came within `max + WAKE_ALLOWANCE`), the next idle
///   period spins `max` once: a *probe*. A probe that pays restores the budget to `max`
///   (a burst after idleness recovers in two requests); one that expires counts as
///   wasted, and the next probe waits twice as many idle periods as the last, up to 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpinBudget {
    max: Duration,
    budget: Duration,
    /// The next idle period spins `max`.
    probe: bool,
    /// Probes that expired since a spin last paid.
    failed_probes: u32,
    /// Idle periods to go before a short sleep may arm a probe.
    holdoff: u32,
}

impl SpinBudget {
    pub fn new(max: Duration) -> SpinBudget {
        SpinBudget {
            max,
            budget: max,
            probe: false,
            failed_probes: 0,
            holdoff: 0,
        }
    }

    /// How long to spin in the next idle period.
    pub fn get(&self) -> Duration {
        if self.probe {
            self.max
        } else {
            self.budget
        }
    }

    /// An idle period ended after `gap`; `slept`: the spin expired and the driver slept.
    pub fn record(&mut self, gap: Duration, slept: bool) {
        let probed = std::mem::take(&mut self.probe);
        self.holdoff = self.holdoff.saturating_sub(1);
        if !slept {
            self.failed_probes = 0;
            let want = if probed {
                self.max
            } else {
                self.budget.max(gap.saturating_mul(2))
            };
            self.budget = want.min(self.max);
            return;
        }
        if probed {
            self.failed_probes = (self.failed_probes + 1).min(MAX_PROBE_BACKOFF);
            self.holdoff = 1 << self.failed_probes;
        }
        let half = self.budget / 2;
        self.budget = if half < self.max / 8 {
            Duration::ZERO
        } else {
            half
        };
        let soon = gap <= self.max.saturating_add(WAKE_ALLOWANCE);
        self.probe = soon && self.holdoff == 0 && !self.max.is_zero();
    }
}

/// The serve loop's spin: the mode, the maximum and a budget per [`Wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpinPolicy {
    mode: SpinMode,
    device: SpinBudget,
    client: SpinBudget,
}

impl SpinPolicy {
    pub fn new(mode: SpinMode, max: Duration) -> SpinPolicy {
        SpinPolicy {
            mode,
            device: SpinBudget::new(max),
            client: SpinBudget::new(max),
        }
    }

    fn budget_for(&mut self, wait: Wait) -> &mut SpinBudget {
        match wait {
            Wait::Device => &mut self.device,
            Wait::Client => &mut self.client,
        }
    }

    /// How long to spin when going idle waiting for `wait`.
    pub fn budget(&self, wait: Wait) -> Duration {
        match wait {
            Wait::Device => self.device.get(),
            Wait::Client => self.client.get(),
        }
    }

    /// An idle period that waited for `wait` ended after `gap` (see [`SpinBudget::record`]).
    pub fn record(&mut self, wait: Wait, gap: Duration, slept: bool) {
        if self.mode == SpinMode::Adaptive {
            self.budget_for(wait).record(gap, slept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);
    /// What a sleep adds to a gap in these tests (the loop measures it, never assumes it).
    const WAKE: Duration = Duration::from_micros(20);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Plays idle periods of the given true gaps through `b` as the serve loop would:
    /// a gap within the spin is caught, a longer one is seen after a sleep and a wake-up.
    /// Returns the time spun in all.
    fn play(b: &mut SpinBudget, gaps: impl IntoIterator<Item = Duration>) -> Duration {
        let mut spun = Duration::ZERO;
        for gap in gaps {
            let spin = b.get();
            if gap <= spin {
                spun += gap;
                b.record(gap, false);
            } else {
                spun += spin;
                b.record(gap + WAKE, true);
            }
        }
        spun
    }

    #[test]
    fn a_stream_of_short_gaps_keeps_spinning() {
        let mut b = SpinBudget::new(MAX);
        for i in 0..10_000u64 {
            play(&mut b, [us(20 + i % 30)]);
            assert_eq!(b.get(), MAX);
        }
    }

    #[test]
    fn a_gap_just_past_the_spin_costs_one_probe() {
        let mut b = SpinBudget::new(MAX);
        play(&mut b, [us(40), us(60)]);
        // Halved, but the sleep was short: the next period probes with the maximum...
        assert_eq!(b.budget, us(25));
        assert_eq!(b.get(), MAX);
        // ...which the stream pays for.
        play(&mut b, [us(40)]);
        assert_eq!(b.get(), MAX);
    }

    #[test]
    fn sporadic_long_gaps_drive_the_budget_to_zero() {
        let mut b = SpinBudget::new(MAX);
        let expected = [
            us(25),
            Duration::from_nanos(12_500),
            Duration::from_nanos(6_250),
        ];
        for want in expected {
            play(&mut b, [us(400)]);
            assert_eq!(b.get(), want);
        }
        play(&mut b, [us(400)]);
        assert_eq!(b.get(), Duration::ZERO);
        // And stays there: nothing is spun for sporadic requests.
        assert_eq!(
            play(&mut b, (0..1000).map(|i| us(150 + i * 7))),
            Duration::ZERO
        );
        assert_eq!(b.get(), Duration::ZERO);
    }

    #[test]
    fn a_burst_after_idleness_recovers() {
        let mut b = SpinBudget::new(MAX);
        play(&mut b, (0..10).map(|_| Duration::from_millis(100)));
        assert_eq!(b.get(), Duration::ZERO);
        // Requests now come 40 µs apart: the first is seen after a short sleep, so the
        // second period probes, pays, and the driver spins again.
        play(&mut b, [us(40)]);
        assert_eq!(b.get(), MAX);
        play(&mut b, [us(40)]);
        assert_eq!(b.budget, MAX);
        assert_eq!(play(&mut b, (0..100).map(|_| us(40))), us(40 * 100));
        assert_eq!(b.get(), MAX);
    }

    #[test]
    fn gaps_just_too_long_for_the_maximum_stop_the_spin() {
        // E.g. device completions at 60–90 µs: every sleep is short, but no spin of at
        // most 50 µs catches one. Probes back off, so little is spun.
        let mut b = SpinBudget::new(MAX);
        let spun = play(&mut b, (0..10_000u64).map(|i| us(60 + i % 31)));
        assert!(spun < us(10_000), "spun {spun:?} over 10,000 gaps");
        assert_eq!(b.budget, Duration::ZERO);
    }

    #[test]
    fn mostly_short_gaps_keep_most_of_the_spin() {
        // Three of four gaps within the spin, one a little beyond it.
        let mut b = SpinBudget::new(MAX);
        let gaps = (0..10_000u64).map(|i| if i % 4 == 3 { us(80) } else { us(35) });
        let mut caught = 0;
        for gap in gaps {
            caught += usize::from(gap <= b.get());
            play(&mut b, [gap]);
        }
        assert!(caught >= 7_000, "caught {caught} of 7,500 short gaps");
    }

    #[test]
    fn a_spin_that_pays_near_its_end_grows_the_budget() {
        let mut b = SpinBudget::new(MAX);
        play(&mut b, [us(400), us(400)]);
        assert_eq!(b.get(), Duration::from_nanos(12_500));
        // Caught at 10 µs of a 12.5 µs budget: room for twice that.
        play(&mut b, [us(10)]);
        assert_eq!(b.get(), us(20));
        // Never beyond the maximum.
        play(&mut b, [us(20), us(45)]);
        assert_eq!(b.get(), MAX);
    }

    #[test]
    fn a_zero_maximum_never_spins() {
        let mut b = SpinBudget::new(Duration::ZERO);
        for (gap, slept) in [(0, false), (10, true), (500, true), (3, false), (20, true)] {
            b.record(us(gap), slept);
            assert_eq!(b.get(), Duration::ZERO);
        }
    }

    #[test]
    fn fixed_mode_ignores_what_it_sees() {
        let mut p = SpinPolicy::new(SpinMode::Fixed, MAX);
        for _ in 0..10 {
            p.record(Wait::Client, us(900), true);
            p.record(Wait::Device, us(900), true);
        }
        assert_eq!((p.budget(Wait::Client), p.budget(Wait::Device)), (MAX, MAX));
    }

    #[test]
    fn device_and_client_waits_learn_apart() {
        // Small-file creates: the device answers within the spin, the next request
        // comes long after the driver slept.
        let mut p = SpinPolicy::new(SpinMode::Adaptive, MAX);
        for _ in 0..100 {
            p.record(Wait::Device, us(45), false);
            p.record(Wait::Client, us(250), true);
        }
        assert_eq!(p.budget(Wait::Device), MAX);
        assert_eq!(p.budget(Wait::Client), Duration::ZERO);
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [SpinMode::Fixed, SpinMode::Adaptive] {
            assert_eq!(m.as_str().parse::<SpinMode>(), Ok(m));
        }
        assert!("sometimes".parse::<SpinMode>().is_err());
        assert_eq!(SpinMode::default(), SpinMode::Adaptive);
    }
}

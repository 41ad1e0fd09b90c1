//! How long the serve loop polls before it sleeps (`RING.md`, "Doorbells").
//!
//! A spin that work ends saves a wake-up (tens of µs of latency on a VM); a spin that
//! expires is CPU taken from the client and the kernel, which on a small machine slows the
//! very work the driver waits for. [`SpinMode::Fixed`] always spins the configured
//! maximum; [`SpinMode::Adaptive`] learns per kind of wait ([`Wait`]) from each idle
//! period whether spinning pays, and spins only where most spins do ([`SpinBudget`]).
//! This is policy only: the loop announces its sleep and re-checks the queue exactly as
//! before, whatever the spin.

use std::time::Duration;

/// Whether the spin is fixed or learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpinMode {
    /// Always spin the maximum.
    Fixed,
    /// Spin the maximum only where most spins pay, learned per [`Wait`].
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

/// Allowance for a wake-up's latency when judging a sleep: an idle period that outlasted
/// `max + WAKE_ALLOWANCE` (spin, sleep and wake-up together) was one a spin of `max` would
/// not have caught. Two wake-ups cost about 45 µs each on the 2-vCPU VM of
/// `docs/BENCHMARKS.md`; this rounds that up.
pub const WAKE_ALLOWANCE: Duration = Duration::from_micros(50);

/// Fixed point of [`SpinBudget`]'s hit rate: `ONE` is every idle period caught.
const ONE: u32 = 1024;
/// Each observation moves the hit rate by 1/8 of the way (an average over ~8 periods).
const WEIGHT_SHIFT: u32 = 3;
/// Spinning starts once the hit rate reaches 5/8 and stops below 3/8: spin only where
/// most spins pay, without flapping on a few unlucky gaps.
const START: u32 = ONE * 5 / 8;
const STOP: u32 = ONE * 3 / 8;
/// Completions are spun for while at least this share of the client's requests would be
/// caught ([`SpinPolicy`]).
const CLIENT_GATE: u32 = ONE / 4;
/// While not spinning, at most this many idle periods pass between probes.
const MAX_PROBE_EVERY: u32 = 64;

/// One learned spin, `max` or nothing. Pure and deterministic: the loop measures each
/// idle period (from its last progress to its next) and reports it with
/// [`SpinBudget::record`].
///
/// It keeps an estimate of the share of idle periods a spin of `max` catches (a moving
/// average over about eight periods), and spins `max` while that share is high (from 5/8
/// up; it stops below 3/8). Between the two there is nothing to gain: a spin that expires
/// costs the whole budget, and the gaps that matter cluster just below the maximum (a
/// synchronous stream's at 40–50 µs of 50), so a shorter budget catches none of them.
/// Observations:
///
/// - Work arrived during the spin: a hit.
/// - A spin of `max` expired: a miss.
/// - The driver slept without spinning: a hit if work came within `max` of the idle
///   period's start (a spin would have caught it, wake-up latency and all), a miss if it
///   came after `max + WAKE_ALLOWANCE`; in between the wake-up hides which, so nothing.
///
/// While not spinning, a *probe* spins `max` once in a while: the interval between probes
/// doubles after one that expired (up to 64 idle periods) and shrinks to a quarter after
/// one that paid, so it grows where fewer than a third of the probes pay (a workload whose
/// gaps are just too long for the maximum costs one spin per 64 periods) and shrinks
/// where most do (a burst after idleness is spun for again within about 100 periods, or
/// 8 if its gaps show within `max` even after a sleep).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpinBudget {
    max: Duration,
    /// Estimated share of idle periods a spin of `max` catches, in `1 / ONE`.
    hits: u32,
    spinning: bool,
    /// Idle periods until the next probe, while not spinning (0: this one probes).
    probe_in: u32,
    /// Current interval between probes.
    probe_every: u32,
}

impl SpinBudget {
    /// Starts spinning, at the hit rate where four misses in a row stop it.
    pub fn new(max: Duration) -> SpinBudget {
        SpinBudget {
            max,
            hits: START,
            spinning: true,
            probe_in: 0,
            probe_every: 1,
        }
    }

    /// How long to spin in the next idle period.
    pub fn get(&self) -> Duration {
        if self.spinning || self.probe_in == 0 {
            self.max
        } else {
            Duration::ZERO
        }
    }

    /// Whether this budget spins now (rather than only probing).
    pub fn spins(&self) -> bool {
        self.spinning
    }

    /// Whether at least `share` (in `1 / ONE`) of idle periods would be caught.
    fn catches(&self, share: u32) -> bool {
        self.hits >= share
    }

    /// An idle period spun at most `spun` (this budget's [`SpinBudget::get`], or 0 if the
    /// caller overrode it) and ended after `gap`; `slept`: the spin expired and the driver
    /// slept.
    pub fn record(&mut self, spun: Duration, gap: Duration, slept: bool) {
        let probed = !self.spinning && self.probe_in == 0 && spun >= self.max;
        let hit = if !slept {
            Some(true)
        } else if spun >= self.max {
            Some(false)
        } else if gap <= self.max {
            Some(true)
        } else if gap > self.max.saturating_add(WAKE_ALLOWANCE) {
            Some(false)
        } else {
            None
        };
        if let Some(hit) = hit {
            let target = if hit { ONE } else { 0 };
            // 1/8 of the way to `target`, rounded up: a run of one kind reaches it.
            if target > self.hits {
                self.hits += (target - self.hits).div_ceil(1 << WEIGHT_SHIFT);
            } else {
                self.hits -= (self.hits - target).div_ceil(1 << WEIGHT_SHIFT);
            }
        }
        if probed {
            self.probe_every = if hit == Some(true) {
                (self.probe_every / 4).max(1)
            } else {
                (self.probe_every * 2).min(MAX_PROBE_EVERY)
            };
            self.probe_in = self.probe_every;
        } else if !self.spinning && self.probe_in > 0 {
            self.probe_in -= 1;
        }
        let was = self.spinning;
        self.spinning = self.hits >= if was { STOP } else { START };
        if was && !self.spinning {
            self.probe_in = self.probe_every;
        }
    }
}

/// The serve loop's spin: the mode, the maximum and a budget per [`Wait`].
///
/// Completions are spun for only while at least a quarter of the client's requests come
/// within the spin: catching a completion early saves one wake-up per round trip, which
/// pays when the client answers at once (a synchronous stream) but is a small share of a
/// request that the client takes long to follow (small-file creates, 150 µs and more),
/// and there the spin's CPU is taken from the server on a small machine. Measured: with
/// both budgets learned apart, creates ran as slowly as with a fixed spin; gated on the
/// client's own spin instead of its hit rate, a loaded QD1 stream (client hit rate near
/// 5/8) lost the completion spin each time the client's flickered off
/// (`docs/BENCHMARKS.md`).
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
        match (self.mode, wait) {
            (SpinMode::Fixed, _) => self.client.max,
            (SpinMode::Adaptive, Wait::Client) => self.client.get(),
            (SpinMode::Adaptive, Wait::Device) if self.client.catches(CLIENT_GATE) => {
                self.device.get()
            }
            (SpinMode::Adaptive, Wait::Device) => Duration::ZERO,
        }
    }

    /// An idle period that waited for `wait` and spun at most `spun` (what
    /// [`SpinPolicy::budget`] said) ended after `gap` (see [`SpinBudget::record`]).
    pub fn record(&mut self, wait: Wait, spun: Duration, gap: Duration, slept: bool) {
        if self.mode == SpinMode::Adaptive {
            self.budget_for(wait).record(spun, gap, slept);
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
    /// Returns the time spun and the gaps caught.
    fn play(b: &mut SpinBudget, gaps: impl IntoIterator<Item = Duration>) -> (Duration, usize) {
        let (mut spun, mut caught) = (Duration::ZERO, 0);
        for gap in gaps {
            let spin = b.get();
            if gap <= spin {
                spun += gap;
                caught += 1;
                b.record(spin, gap, false);
            } else {
                spun += spin;
                b.record(spin, gap + WAKE, true);
            }
        }
        (spun, caught)
    }

    /// A deterministic spread of gaps in `[lo, lo + span)`.
    fn spread(n: u64, lo: u64, span: u64) -> impl Iterator<Item = Duration> {
        (0..n).map(move |i| us(lo + i * 7 % span))
    }

    #[test]
    fn a_stream_of_short_gaps_keeps_spinning() {
        let mut b = SpinBudget::new(MAX);
        for gap in spread(10_000, 20, 30) {
            play(&mut b, [gap]);
            assert_eq!(b.get(), MAX);
        }
    }

    #[test]
    fn a_few_gaps_past_the_spin_do_not_stop_it() {
        // A synchronous stream: most gaps at 40–50 µs, one in six at 55–85 µs.
        let mut b = SpinBudget::new(MAX);
        let gaps = (0..12_000u64).map(|i| {
            if i % 6 == 5 {
                us(55 + i % 31)
            } else {
                us(40 + i % 11)
            }
        });
        let (_, caught) = play(&mut b, gaps);
        assert_eq!(caught, 10_000, "every short gap caught");
        assert_eq!(b.get(), MAX);
    }

    #[test]
    fn sporadic_long_gaps_drive_the_budget_to_zero() {
        let mut b = SpinBudget::new(MAX);
        let mut wasted = 0;
        while b.get() > Duration::ZERO {
            play(&mut b, [us(400)]);
            wasted += 1;
        }
        assert_eq!(wasted, 4, "spins wasted before stopping");
        // And stays there, save a probe now and then that backs off to one per 64.
        let (spun, caught) = play(&mut b, spread(10_000, 150, 3000));
        assert_eq!(caught, 0);
        assert!(spun <= MAX * (10_000 / 64 + 7), "spun {spun:?}");
        assert_eq!(b.get(), Duration::ZERO);
    }

    #[test]
    fn a_burst_after_idleness_recovers() {
        let mut b = SpinBudget::new(MAX);
        play(&mut b, (0..1000).map(|_| Duration::from_millis(100)));
        assert_eq!(b.get(), Duration::ZERO);
        assert_eq!(b.hits, 0);
        // Requests now come 45 µs apart: each sleep shows a gap that a spin may or may
        // not have caught; the probes find that it does.
        let mut periods = 0;
        while b.get() < MAX || !b.spinning {
            play(&mut b, [us(45)]);
            periods += 1;
            assert!(periods <= 100, "not spinning after {periods} periods");
        }
        let (_, caught) = play(&mut b, (0..1000).map(|_| us(45)));
        assert_eq!(caught, 1000);
    }

    #[test]
    fn short_sleeps_restart_the_spin_at_once() {
        // Work that came within the maximum even after a sleep and a wake-up.
        let mut b = SpinBudget::new(MAX);
        play(&mut b, (0..100).map(|_| Duration::from_millis(1)));
        let mut periods = 0;
        while !b.spinning {
            b.record(b.get(), us(30), true);
            periods += 1;
        }
        assert!(periods <= 8, "{periods} periods");
    }

    #[test]
    fn gaps_just_too_long_for_the_maximum_stop_the_spin() {
        // E.g. device completions at 60–90 µs: every sleep is short, but no spin of at
        // most 50 µs catches one. Probes back off, so little is spun.
        let mut b = SpinBudget::new(MAX);
        let (spun, caught) = play(&mut b, spread(10_000, 60, 31));
        assert_eq!(caught, 0);
        assert!(
            spun <= MAX * (10_000 / 64 + 10),
            "spun {spun:?} over 10,000 gaps"
        );
        assert_eq!(b.get(), Duration::ZERO);
    }

    #[test]
    fn a_workload_that_mostly_misses_stops_spinning() {
        // One gap in four within the spin.
        let mut b = SpinBudget::new(MAX);
        let gaps = (0..10_000u64).map(|i| if i % 4 == 0 { us(30) } else { us(300) });
        let (spun, _) = play(&mut b, gaps);
        assert!(spun < MAX * 1000, "spun {spun:?}");
    }

    #[test]
    fn a_zero_maximum_never_spins() {
        let mut b = SpinBudget::new(Duration::ZERO);
        for (gap, slept) in [(0, false), (10, true), (500, true), (3, false), (20, true)] {
            b.record(b.get(), us(gap), slept);
            assert_eq!(b.get(), Duration::ZERO);
        }
    }

    #[test]
    fn fixed_mode_ignores_what_it_sees() {
        let mut p = SpinPolicy::new(SpinMode::Fixed, MAX);
        for _ in 0..10 {
            p.record(Wait::Client, MAX, us(900), true);
            p.record(Wait::Device, MAX, us(900), true);
        }
        assert_eq!((p.budget(Wait::Client), p.budget(Wait::Device)), (MAX, MAX));
    }

    /// Plays alternating device and client waits through `p`, as `play` does.
    fn play_policy(p: &mut SpinPolicy, n: usize, device: Duration, client: Duration) -> Duration {
        let mut spun = Duration::ZERO;
        for _ in 0..n {
            for (wait, gap) in [(Wait::Device, device), (Wait::Client, client)] {
                let spin = p.budget(wait);
                if gap <= spin {
                    spun += gap;
                    p.record(wait, spin, gap, false);
                } else {
                    spun += spin;
                    p.record(wait, spin, gap + WAKE, true);
                }
            }
        }
        spun
    }

    #[test]
    fn a_synchronous_stream_spins_for_both() {
        // fio QD1: completions 25–35 µs after submission, the next request 40–50 µs
        // after the completion.
        let mut p = SpinPolicy::new(SpinMode::Adaptive, MAX);
        play_policy(&mut p, 1000, us(30), us(45));
        assert_eq!((p.budget(Wait::Device), p.budget(Wait::Client)), (MAX, MAX));
    }

    #[test]
    fn completions_are_spun_for_while_the_client_spin_flickers() {
        // A loaded QD1 stream: two requests in three come within the spin, the others
        // in runs of eight (the machine busy elsewhere), which stop the client's spin.
        let mut p = SpinPolicy::new(SpinMode::Adaptive, MAX);
        let mut device_spun = 0;
        for i in 0..5_000u64 {
            let client = if i % 24 < 16 {
                us(45)
            } else {
                us(70 + i % 200)
            };
            device_spun += usize::from(p.budget(Wait::Device) == MAX);
            play_policy(&mut p, 1, us(30), client);
        }
        assert!(
            device_spun >= 4_900,
            "completions spun for in {device_spun} of 5,000"
        );
    }

    #[test]
    fn completions_are_not_spun_for_when_requests_come_late() {
        // Small-file creates: the device answers within the spin, the next request
        // comes long after. Neither wait is spun for, though a device spin would pay.
        let mut p = SpinPolicy::new(SpinMode::Adaptive, MAX);
        play_policy(&mut p, 100, us(45), us(250));
        assert_eq!(p.budget(Wait::Device), Duration::ZERO);
        assert!(
            p.device.spins(),
            "the device budget itself still says spinning pays"
        );
        assert!(!p.client.spins());
        let spun = play_policy(&mut p, 10_000, us(45), us(250));
        assert!(spun <= MAX * (10_000 / 64 + 10), "spun {spun:?}");
        // When the client speeds up, both spin again.
        play_policy(&mut p, 200, us(45), us(45));
        assert_eq!((p.budget(Wait::Device), p.budget(Wait::Client)), (MAX, MAX));
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

//! Rate limits (SPEC §8.3): requests and tokens per minute on consumer keys and consumers,
//! enforced by every data plane from its own counts, optionally shared with the other data
//! planes through a counter store (Redis) in batches, so that no request waits on it.
//!
//! Each limit is a bucket holding one minute's allowance that refills continuously: a client may
//! burst a whole minute's allowance, then goes at the limit's pace. Requests are taken at
//! admission; tokens are charged after the response (the metering's counts), so a request is
//! admitted while its token allowance is not negative and a large answer can drive it below zero
//! (the next requests then wait until the refill brings it back).
//!
//! Arithmetic is exact integers: a bucket's level is kept in units of 1/60,000,000 of a request
//! (or token) — one minute in microseconds — so a limit of `L` per minute refills exactly `L`
//! units per microsecond and a request costs 60,000,000 units. No floating point, no drift.
//!
//! Sharing: every data plane adds what it took since the last synchronisation to its own field
//! of one counter per (subject, kind, UTC minute) in the store and reads the other fields back;
//! whatever they grew by since it last looked was taken by the other data planes, and is taken
//! from the local bucket too (a data plane that first looks at a minute's counter takes all the
//! others' share of that minute; what they add after its last look in a minute is not seen). So each data plane's bucket sees every data plane's traffic, late by at most one
//! synchronisation interval (the overshoot this allows is that interval's traffic). While the
//! store cannot be reached, each data plane enforces its own counts (and says so in a metric).

use std::collections::HashMap;
use std::sync::Mutex;

use uuid::Uuid;

/// Microseconds in a minute: the units of one request or token in a bucket.
pub const UNIT: i128 = 60_000_000;

/// The most a per-minute limit may be (10¹² tokens a minute): keeps every level far inside
/// 128 bits, and is beyond any vendor's limit.
pub const MAX_PER_MINUTE: u64 = 1_000_000_000_000;

/// What a rate limit applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Key(Uuid),
    Consumer(Uuid),
}

/// Which limit refused a request (`type` of the 429 body: `requests` or `tokens`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LimitKind {
    Requests,
    Tokens,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
        }
    }
}

/// A subject's per-minute limits (`None`: no limit of that kind).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerMinute {
    pub requests: Option<u32>,
    pub tokens: Option<u64>,
}

impl PerMinute {
    pub fn is_unlimited(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }

    fn limit(&self, kind: LimitKind) -> Option<u64> {
        match kind {
            LimitKind::Requests => self.requests.map(u64::from),
            LimitKind::Tokens => self.tokens,
        }
        .map(|l| l.min(MAX_PER_MINUTE))
    }
}

/// The answer to a request's admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Refused: which limit, and in how many whole seconds it will admit again (at least 1).
    Refuse {
        kind: LimitKind,
        retry_after_secs: u64,
    },
}

/// One limit's bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Units available (may be negative for tokens).
    level: i128,
    /// When `level` was last brought up to date (µs).
    at: i64,
    /// The limit it was last refilled at (per minute).
    limit: u64,
}

impl Bucket {
    fn full(limit: u64, now: i64) -> Bucket {
        Bucket {
            level: i128::from(limit) * UNIT,
            at: now,
            limit,
        }
    }

    /// Refills to `now` at `limit` per minute, never above a minute's allowance. A clock that
    /// goes back refills nothing.
    fn refill(&mut self, limit: u64, now: i64) {
        let elapsed = i128::from(now.saturating_sub(self.at).max(0));
        let cap = i128::from(limit) * UNIT;
        self.level = (self.level + elapsed * i128::from(limit)).min(cap);
        self.at = self.at.max(now);
        self.limit = limit;
    }

    /// Refilled to `now`, it holds a whole minute's allowance: forgetting it changes nothing.
    fn full_at(&self, now: i64) -> bool {
        let mut b = *self;
        b.refill(self.limit, now);
        b.level >= i128::from(self.limit) * UNIT
    }

    /// Whole seconds until the level reaches `need` units at `limit` per minute (≥ 1).
    fn wait_secs(&self, need: i128, limit: u64) -> u64 {
        if limit == 0 {
            return 60;
        }
        let missing = (need - self.level).max(0);
        let micros = (missing + i128::from(limit) - 1) / i128::from(limit);
        let secs = (micros + 999_999) / 1_000_000;
        u64::try_from(secs.max(1)).unwrap_or(u64::MAX)
    }
}

/// A subject's buckets and what it took since the last synchronisation.
#[derive(Clone, Debug, Default)]
struct State {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// Taken here since the last synchronisation (requests, tokens).
    unsynced: (u64, u64),
    /// The last admission (µs): a subject is kept at least [`HOLD_MICROS`] after it, so the
    /// tokens of a response still running are charged to the bucket that admitted it.
    last_admit: i64,
}

/// How long a subject is kept after its last admission, whatever its buckets hold: the
/// longest response whose tokens are sure to be charged.
pub const HOLD_MICROS: i64 = 10 * 60_000_000;

/// How long after its last admission a subject is still synchronised with the other data
/// planes (every interval, even with nothing to add).
pub const SYNC_ACTIVE_MICROS: i64 = 2 * 60_000_000;

impl State {
    fn bucket(&mut self, kind: LimitKind) -> &mut Option<Bucket> {
        match kind {
            LimitKind::Requests => &mut self.requests,
            LimitKind::Tokens => &mut self.tokens,
        }
    }

    /// The bucket of `kind` refilled to `now` (created full), or `None` without a limit.
    fn current(&mut self, kind: LimitKind, limits: &PerMinute, now: i64) -> Option<&mut Bucket> {
        let limit = limits.limit(kind)?;
        let b = self
            .bucket(kind)
            .get_or_insert_with(|| Bucket::full(limit, now));
        b.refill(limit, now);
        Some(b)
    }
}

const SHARDS: usize = 16;

/// The shared counters' window: each counter counts one UTC minute (a counter never holds more
/// than a minute of history, so a data plane that first sees it takes all of it as recent).
pub fn window(now: i64) -> i64 {
    now.div_euclid(60_000_000)
}

/// What a data plane knows of the shared counters: for each (subject, kind), the minute and
/// the sum of the *other* data planes' additions it last saw. Each counter holds one field per
/// data plane, so a data plane's own additions are never mistaken for the others' (whatever
/// answers it missed or subjects it forgot meanwhile).
#[derive(Debug, Default)]
pub struct SharedCounts {
    seen: HashMap<(Subject, LimitKind), (i64, u64)>,
}

impl SharedCounts {
    /// The other data planes' additions to the counter of `(subject, kind)` for minute
    /// `window` now sum to `others_total`: what they added since this data plane last looked
    /// (all of it when it first looks at this minute's counter: it is all within the minute).
    pub fn others(
        &mut self,
        subject: Subject,
        kind: LimitKind,
        window: i64,
        others_total: u64,
    ) -> u64 {
        let since = match self.seen.insert((subject, kind), (window, others_total)) {
            Some((w, prev)) if w == window => prev,
            _ => 0,
        };
        others_total.saturating_sub(since)
    }

    /// Forgets what was seen of counters of minutes before `window` (a new minute's counter
    /// starts from nothing): memory follows the subjects synchronised this minute.
    pub fn forget_before(&mut self, window: i64) {
        self.seen.retain(|_, (w, _)| *w >= window);
    }
}

/// What one subject took on this data plane since the last synchronisation, per kind it has a
/// limit of (`None`: no limit of that kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsynced {
    pub subject: Subject,
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
}

/// A subject's map: hashed with foldhash (seeded per process; subjects are keygate's own ids,
/// never chosen by a client), the same hash choosing the shard.
type Subjects = HashMap<Subject, State, foldhash::fast::RandomState>;

/// Every subject's buckets on this data plane.
pub struct RateLimiter {
    hasher: foldhash::fast::RandomState,
    shards: [Mutex<Subjects>; SHARDS],
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter {
            hasher: Default::default(),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::default())),
        }
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").finish_non_exhaustive()
    }
}

/// Checks every limited subject's buckets, then (only if all admit) takes one request from
/// each: a refusal by one takes nothing from the other.
fn admit_states(states: &mut [(&mut State, &PerMinute)], now: i64) -> Admission {
    for (state, limits) in states.iter_mut() {
        if let Some(b) = state.current(LimitKind::Requests, limits, now)
            && b.level < UNIT
        {
            let wait = b.wait_secs(UNIT, limits.limit(LimitKind::Requests).unwrap_or(0));
            return Admission::Refuse {
                kind: LimitKind::Requests,
                retry_after_secs: wait,
            };
        }
        if let Some(b) = state.current(LimitKind::Tokens, limits, now)
            && b.level < 0
        {
            let wait = b.wait_secs(0, limits.limit(LimitKind::Tokens).unwrap_or(0));
            return Admission::Refuse {
                kind: LimitKind::Tokens,
                retry_after_secs: wait,
            };
        }
    }
    for (state, limits) in states.iter_mut() {
        if let Some(b) = state.current(LimitKind::Requests, limits, now) {
            b.level -= UNIT;
        }
        state.unsynced.0 = state.unsynced.0.saturating_add(1);
        state.last_admit = state.last_admit.max(now);
    }
    Admission::Admit
}

impl RateLimiter {
    fn shard_index(&self, s: &Subject) -> usize {
        use std::hash::BuildHasher;
        (self.hasher.hash_one(s) as usize) % SHARDS
    }

    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, Subjects> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard(&self, s: &Subject) -> std::sync::MutexGuard<'_, Subjects> {
        self.lock(self.shard_index(s))
    }

    /// Admits a request of `key` (limits `key_limits`) and of its consumer, if any (limits
    /// `consumer_limits`) at `now` (µs): both must have a request and a non-negative token
    /// allowance; an admitted request takes one request from both. A refusal takes nothing.
    /// Both subjects' shards are held together (locked in shard order), so the check and the
    /// take are one step: concurrent requests never both pass on the last request.
    pub fn admit(
        &self,
        key: (Uuid, &PerMinute),
        consumer: Option<(Uuid, &PerMinute)>,
        now: i64,
    ) -> Admission {
        let k = (!key.1.is_unlimited()).then_some((Subject::Key(key.0), key.1));
        let c = consumer
            .filter(|(_, l)| !l.is_unlimited())
            .map(|(id, l)| (Subject::Consumer(id), l));
        match (k, c) {
            (None, None) => Admission::Admit,
            (Some((s, l)), None) | (None, Some((s, l))) => {
                let mut shard = self.shard(&s);
                admit_states(&mut [(shard.entry(s).or_default(), l)], now)
            }
            (Some((ks, kl)), Some((cs, cl))) => {
                let (ki, ci) = (self.shard_index(&ks), self.shard_index(&cs));
                if ki == ci {
                    let mut shard = self.lock(ki);
                    shard.entry(ks).or_default();
                    shard.entry(cs).or_default();
                    let [Some(kst), Some(cst)] = shard.get_disjoint_mut([&ks, &cs]) else {
                        unreachable!("a key and a consumer are distinct subjects, both present")
                    };
                    admit_states(&mut [(kst, kl), (cst, cl)], now)
                } else {
                    let (mut first, mut second) = (self.lock(ki.min(ci)), self.lock(ki.max(ci)));
                    let (kmap, cmap) = if ki < ci {
                        (&mut *first, &mut *second)
                    } else {
                        (&mut *second, &mut *first)
                    };
                    admit_states(
                        &mut [
                            (kmap.entry(ks).or_default(), kl),
                            (cmap.entry(cs).or_default(), cl),
                        ],
                        now,
                    )
                }
            }
        }
    }

    /// Charges `tokens` to `key` and its consumer at the given limits, creating their buckets
    /// (the data planes charge through [`RateLimiter::charge_admitted`]; tests set up buckets
    /// with this). Subjects without a token limit are not tracked.
    #[cfg(test)]
    pub fn charge_tokens(
        &self,
        key: (Uuid, &PerMinute),
        consumer: Option<(Uuid, &PerMinute)>,
        tokens: u64,
        now: i64,
    ) {
        let subjects = [
            Some((Subject::Key(key.0), key.1)),
            consumer.map(|(id, l)| (Subject::Consumer(id), l)),
        ];
        for (s, limits) in subjects.iter().flatten() {
            if limits.tokens.is_none() {
                continue;
            }
            let mut shard = self.shard(s);
            let state = shard.entry(*s).or_default();
            if let Some(b) = state.current(LimitKind::Tokens, limits, now) {
                b.level -= i128::from(tokens) * UNIT;
            }
            state.unsynced.1 = state.unsynced.1.saturating_add(tokens);
        }
    }

    /// Charges `tokens` (a response's input + output) after the response to the token
    /// buckets that admitted it — `key`'s and its consumer's, at the limits they were admitted
    /// with (the response may end after the limits changed, or on a data plane path that no
    /// longer holds them). Subjects without a token bucket are not limited by tokens.
    pub fn charge_admitted(&self, key: Uuid, consumer: Option<Uuid>, tokens: u64, now: i64) {
        if tokens == 0 {
            return;
        }
        for s in [Some(Subject::Key(key)), consumer.map(Subject::Consumer)]
            .into_iter()
            .flatten()
        {
            let mut shard = self.shard(&s);
            // A subject this data plane did not admit (another data plane behind the same
            // cluster did, and this one metered the answer): no bucket to charge here, but the
            // tokens are still shared through the counter store with the one that admitted it.
            let state = shard.entry(s).or_default();
            if let Some(b) = &mut state.tokens {
                b.refill(b.limit, now);
                b.level -= i128::from(tokens) * UNIT;
            } else {
                state.last_admit = state.last_admit.max(now);
            }
            state.unsynced.1 = state.unsynced.1.saturating_add(tokens);
        }
    }

    /// Forgets what was taken since the last synchronisation (a data plane that shares its
    /// counts with no one), so idle subjects can be forgotten.
    pub fn clear_unsynced(&self) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for state in shard.values_mut() {
                state.unsynced = (0, 0);
            }
        }
    }

    /// Every subject active in the last two minutes (an admission, or anything taken since the
    /// last call: the current and the previous minute's counters, so a data plane learns the
    /// others' use of a key before it admits that key again), with what it took since the last
    /// call, per limited kind (zero too: the shared store is asked for the others' share of
    /// every active subject; tokens also for a subject with no token bucket here, when another
    /// data plane's request was metered here).
    pub fn take_unsynced(&self, now: i64) -> Vec<Unsynced> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (s, state) in shard.iter_mut() {
                let recent = now.saturating_sub(state.last_admit) < SYNC_ACTIVE_MICROS;
                if !recent && state.unsynced == (0, 0) {
                    continue;
                }
                let (r, t) = std::mem::take(&mut state.unsynced);
                out.push(Unsynced {
                    subject: *s,
                    requests: state.requests.map(|_| r),
                    tokens: (state.tokens.is_some() || t > 0).then_some(t),
                });
            }
        }
        out
    }

    /// The other data planes took `requests` and `tokens` from `subject`: take them here too,
    /// from the buckets it has (at the limits they were last used with).
    pub fn take_remote(&self, subject: Subject, requests: u64, tokens: u64, now: i64) {
        let mut shard = self.shard(&subject);
        let Some(state) = shard.get_mut(&subject) else {
            return;
        };
        for (b, n) in [(&mut state.requests, requests), (&mut state.tokens, tokens)] {
            if let Some(b) = b {
                b.refill(b.limit, now);
                b.level -= i128::from(n) * UNIT;
            }
        }
    }

    /// Forgets subjects whose buckets are full again, that have nothing unsynchronised and
    /// admitted nothing for [`HOLD_MICROS`] (a forgotten subject starts full: the same):
    /// memory follows the active subjects only.
    pub fn forget_idle(&self, now: i64) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, state| {
                let full = |b: &Option<Bucket>| b.is_none_or(|b| b.full_at(now));
                let held = now.saturating_sub(state.last_admit) < HOLD_MICROS;
                held || !(full(&state.requests) && full(&state.tokens) && state.unsynced == (0, 0))
            });
        }
    }

    /// Subjects tracked now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[path = "ratelimit_tests.rs"]
mod tests;

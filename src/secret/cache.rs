//! Resolved secret values by reference, with the status `Get*Key` shows. The control plane
//! reads each reference through its provider (off the async runtime, with a deadline, at most
//! one read per reference at a time), keeps the last good value when a read fails, and knows
//! when each value is due for its refresh. The snapshot builder only takes values from here
//! (`for_snapshot`): it never waits on a provider.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::provider::{EnvProvider, FileProvider, SecretError, SecretProvider};
use crate::crypto::Secret;
use crate::domain::{RuleError, SecretRef, Timestamp};
use crate::metrics::METRICS;

/// A reference's resolution state as `Get*Key` shows it (`secret_status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretStatus {
    /// The last successful resolution.
    pub last_refresh_time: Option<Timestamp>,
    /// Why the last attempt failed; empty when it succeeded.
    pub last_error: String,
}

struct Entry {
    /// The last good value (kept when a refresh fails).
    value: Option<Secret>,
    /// When the value was last read successfully: the refresh schedule counts from here.
    fetched: Option<Instant>,
    /// When the last attempt (good or bad) was made.
    attempted: Instant,
    /// The value the snapshot builder last put into a published snapshot (model keys): the
    /// background refresh compares a new read with this, not with `value`, which admin
    /// requests and failed commits may have updated.
    applied: Option<Secret>,
    status: SecretStatus,
}

/// What a successful read found, against the value held before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// The first successful read of this reference in this process.
    First,
    Changed,
    Same,
}

/// How long an entry no key uses is kept after its last attempt (see `Secrets::retain`).
const RETAIN_GRACE: Duration = Duration::from_secs(60);

/// How long one read may take before the reference is reported stuck. The blocked read
/// keeps its thread until it returns, and no second read of that reference starts meanwhile.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);

struct Inner {
    providers: Vec<Arc<dyn SecretProvider>>,
    ttl: Duration,
    deadline: Duration,
    entries: Mutex<HashMap<SecretRef, Entry>>,
    /// References with a read running on a blocking thread right now.
    reading: Mutex<HashSet<SecretRef>>,
    /// Signalled when the builder met a reference it holds no value for.
    wanted: Notify,
}

/// Removes a reference from `reading` when its read returns (or panics).
struct Reading(Arc<Inner>, SecretRef);

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.reading.lock().expect("reading lock").remove(&self.1);
    }
}

/// The control plane's secret resolver and cache. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Secrets {
    inner: Arc<Inner>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field(
                "providers",
                &self
                    .inner
                    .providers
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>(),
            )
            .field("ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

/// The `version` of a reference as providers take it (empty = the latest).
fn version_of(r: &SecretRef) -> Option<&str> {
    (!r.version.is_empty()).then_some(r.version.as_str())
}

impl SecretError {
    /// The admin API's refusal: a malformed reference is `INVALID_ARGUMENT` on
    /// `<field>.<part>`; anything that does not resolve is `FAILED_PRECONDITION` naming the
    /// provider, name and version.
    pub fn to_rule(&self, field: &str, r: &SecretRef) -> RuleError {
        match self {
            SecretError::Invalid { field: part, why } => {
                RuleError::invalid(&format!("{field}.{part}"), why.clone())
            }
            other => {
                RuleError::FailedPrecondition(format!("{field} ({r}) cannot be resolved: {other}"))
            }
        }
    }
}

/// The entry of `r`, created empty when this is its first attempt.
fn entry<'a>(
    entries: &'a mut HashMap<SecretRef, Entry>,
    r: &SecretRef,
    now: Instant,
) -> &'a mut Entry {
    entries.entry(r.clone()).or_insert_with(|| Entry {
        value: None,
        fetched: None,
        attempted: now,
        applied: None,
        status: SecretStatus::default(),
    })
}

impl Secrets {
    pub fn new(providers: Vec<Arc<dyn SecretProvider>>, ttl: Duration) -> Self {
        Secrets::with_read_deadline(providers, ttl, READ_DEADLINE)
    }

    /// `new` with another read deadline than `READ_DEADLINE` (tests).
    pub fn with_read_deadline(
        providers: Vec<Arc<dyn SecretProvider>>,
        ttl: Duration,
        deadline: Duration,
    ) -> Self {
        Secrets {
            inner: Arc::new(Inner {
                providers,
                ttl,
                deadline,
                entries: Mutex::new(HashMap::new()),
                reading: Mutex::new(HashSet::new()),
                wanted: Notify::new(),
            }),
        }
    }

    /// The built-in providers: `env` always, `file` when a secrets directory is configured.
    pub fn builtin(secrets_dir: Option<PathBuf>, ttl: Duration) -> Self {
        let mut providers: Vec<Arc<dyn SecretProvider>> = vec![Arc::new(EnvProvider)];
        if let Some(dir) = secrets_dir {
            providers.push(Arc::new(FileProvider::new(dir)));
        }
        Secrets::new(providers, ttl)
    }

    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    fn provider(&self, name: &str) -> Result<Arc<dyn SecretProvider>, SecretError> {
        self.inner
            .providers
            .iter()
            .find(|p| p.name() == name)
            .cloned()
            .ok_or_else(|| SecretError::UnknownProvider(name.to_string()))
    }

    /// Reads the reference now, off the async runtime. The cache is not touched. A read that
    /// does not return within `READ_DEADLINE` is reported `Stuck`, and so is every later
    /// attempt while it is still blocked (one thread per reference at most).
    pub async fn fetch(&self, r: &SecretRef) -> Result<Secret, SecretError> {
        let provider = self.provider(&r.provider)?;
        let stuck = || SecretError::Stuck {
            provider: r.provider.clone(),
            name: r.name.clone(),
            seconds: self.inner.deadline.as_secs(),
        };
        if !self
            .inner
            .reading
            .lock()
            .expect("reading lock")
            .insert(r.clone())
        {
            return Err(stuck());
        }
        let guard = Reading(self.inner.clone(), r.clone());
        let r2 = r.clone();
        let read = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            provider.resolve(&r2.name, version_of(&r2))
        });
        match tokio::time::timeout(self.inner.deadline, read).await {
            Err(_) => Err(stuck()),
            Ok(done) => done.unwrap_or_else(|e| {
                Err(SecretError::Io {
                    provider: r.provider.clone(),
                    name: r.name.clone(),
                    why: format!("resolver task failed: {e}"),
                })
            }),
        }
    }

    /// Records a successful read and how it compares with the value held before.
    pub fn record_success(&self, r: &SecretRef, value: &Secret) -> Read {
        let now = Instant::now();
        let mut entries = self.inner.entries.lock().expect("secret cache lock");
        let e = entry(&mut entries, r, now);
        let read = match &e.value {
            None => Read::First,
            Some(v) if v != value => Read::Changed,
            Some(_) => Read::Same,
        };
        if read != Read::Same {
            e.value = Some(value.clone());
        }
        e.fetched = Some(now);
        e.attempted = now;
        e.status = SecretStatus {
            last_refresh_time: Some(Timestamp::now()),
            last_error: String::new(),
        };
        read
    }

    /// Records a failed read: the last good value stays; the failure is counted, logged (by
    /// reference) and shown on the key.
    pub fn record_failure(&self, r: &SecretRef, err: &SecretError) {
        METRICS
            .secret_refresh_failures
            .with_label_values(&[r.provider.as_str()])
            .inc();
        let message = format!("{err}");
        tracing::warn!(
            provider = %r.provider,
            name = %r.name,
            version = %r.version,
            error = %message,
            "secret refresh failed; keeping the last good value"
        );
        let now = Instant::now();
        let mut entries = self.inner.entries.lock().expect("secret cache lock");
        let e = entry(&mut entries, r, now);
        e.attempted = now;
        e.status.last_error = message;
    }

    /// A value that was read but could not be applied to the store: counted and shown on the
    /// key like a failed read (`why` names no value).
    pub fn record_apply_failure(&self, r: &SecretRef, why: String) {
        METRICS
            .secret_refresh_failures
            .with_label_values(&[r.provider.as_str()])
            .inc();
        tracing::warn!(
            provider = %r.provider,
            name = %r.name,
            version = %r.version,
            error = %why,
            "secret refresh read a new value that was not applied"
        );
        let mut entries = self.inner.entries.lock().expect("secret cache lock");
        entry(&mut entries, r, Instant::now()).status.last_error = why;
    }

    /// The snapshot builder put `value` into a snapshot it published.
    pub fn mark_applied(&self, r: &SecretRef, value: &Secret) {
        let mut entries = self.inner.entries.lock().expect("secret cache lock");
        if let Some(e) = entries.get_mut(r) {
            e.applied = Some(value.clone());
        }
    }

    /// Whether `value` differs from what the last published snapshot holds for `r` (true
    /// when nothing was published for it).
    pub fn differs_from_applied(&self, r: &SecretRef, value: &Secret) -> bool {
        let entries = self.inner.entries.lock().expect("secret cache lock");
        entries
            .get(r)
            .is_none_or(|e| e.applied.as_ref() != Some(value))
    }

    /// The last good value, if the reference ever resolved in this process.
    pub fn cached(&self, r: &SecretRef) -> Option<Secret> {
        let entries = self.inner.entries.lock().expect("secret cache lock");
        entries.get(r).and_then(|e| e.value.clone())
    }

    /// What `Get*Key` shows; `None` before this process first tried the reference.
    pub fn status(&self, r: &SecretRef) -> Option<SecretStatus> {
        let entries = self.inner.entries.lock().expect("secret cache lock");
        entries.get(r).map(|e| e.status.clone())
    }

    /// Whether `r` should be read again at `now`: never read, last attempt failed (retried
    /// each `retry`), or its value would expire within `lead` (refreshed before it expires).
    pub fn due(&self, r: &SecretRef, now: Instant, lead: Duration, retry: Duration) -> bool {
        let entries = self.inner.entries.lock().expect("secret cache lock");
        match entries.get(r) {
            None => true,
            Some(e) if !e.status.last_error.is_empty() || e.fetched.is_none() => {
                now >= e.attempted + retry
            }
            Some(e) => {
                let fetched = e.fetched.expect("checked above");
                now + lead >= fetched + self.inner.ttl
            }
        }
    }

    /// Forgets references no key uses any more (their values are zeroised on drop). `live`
    /// was read at `listed`; an entry attempted less than `RETAIN_GRACE` before that is kept:
    /// an admin request resolves a reference before the key that uses it is committed, so the
    /// list may predate its key.
    pub fn retain(&self, live: &HashSet<SecretRef>, listed: Instant) {
        let mut entries = self.inner.entries.lock().expect("secret cache lock");
        entries.retain(|r, e| live.contains(r) || e.attempted + RETAIN_GRACE >= listed);
    }

    /// The value the snapshot builder uses: the last good one, without any I/O. `None` when
    /// the reference has not resolved in this process yet — such a key is not served, and the
    /// background refresh is woken to read it (see `wanted`).
    pub fn for_snapshot(&self, r: &SecretRef) -> Option<Secret> {
        let v = self.cached(r);
        if v.is_none() {
            self.inner.wanted.notify_one();
        }
        v
    }

    /// Resolves when the builder met a reference without a value (a permit is kept when no
    /// one is waiting, so a wake-up between two refresh rounds is not lost).
    pub async fn wanted(&self) {
        self.inner.wanted.notified().await
    }

    /// The references whose last attempt failed (or whose new value was not applied), for
    /// `/readyz`: `(reference, last_error)`, sorted.
    pub fn failing(&self) -> Vec<(String, String)> {
        let entries = self.inner.entries.lock().expect("secret cache lock");
        let mut out: Vec<(String, String)> = entries
            .iter()
            .filter(|(_, e)| !e.status.last_error.is_empty())
            .map(|(r, e)| (r.to_string(), e.status.last_error.clone()))
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Mutex<Result<String, ()>>);

    impl SecretProvider for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn resolve(&self, name: &str, _: Option<&str>) -> Result<Secret, SecretError> {
            match &*self.0.lock().unwrap() {
                Ok(v) => Ok(Secret::new(v.clone())),
                Err(()) => Err(SecretError::NotFound {
                    provider: "fixed".into(),
                    name: name.into(),
                    version: String::new(),
                }),
            }
        }
    }

    /// What the background refresh does with one reference, then what the builder takes.
    async fn read(secrets: &Secrets, r: &SecretRef) -> Option<Secret> {
        match secrets.fetch(r).await {
            Ok(v) => {
                secrets.record_success(r, &v);
            }
            Err(e) => secrets.record_failure(r, &e),
        }
        secrets.for_snapshot(r)
    }

    /// A provider whose reads block until released.
    struct Blocking(Arc<(Mutex<bool>, std::sync::Condvar)>);

    impl SecretProvider for Blocking {
        fn name(&self) -> &str {
            "fixed"
        }
        fn resolve(&self, _: &str, _: Option<&str>) -> Result<Secret, SecretError> {
            let (released, cv) = &*self.0;
            let mut r = released.lock().unwrap();
            while !*r {
                r = cv.wait(r).unwrap();
            }
            Ok(Secret::new("sk-after-the-stall-0123456789".into()))
        }
    }

    #[tokio::test]
    async fn a_stuck_read_times_out_is_shown_and_never_doubles_up() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let secrets = Secrets::with_read_deadline(
            vec![Arc::new(Blocking(gate.clone()))],
            Duration::from_secs(300),
            Duration::from_millis(50),
        );
        let r = reference();
        let e = secrets.fetch(&r).await.unwrap_err();
        assert!(matches!(e, SecretError::Stuck { .. }), "{e}");
        secrets.record_failure(&r, &e);
        // The builder takes nothing (never resolved) without waiting, and wakes the refresh.
        assert!(secrets.for_snapshot(&r).is_none());
        tokio::time::timeout(Duration::from_secs(1), secrets.wanted())
            .await
            .expect("the refresh is woken");
        // A second attempt while the first is blocked starts no new read.
        let e = secrets.fetch(&r).await.unwrap_err();
        assert!(e.to_string().contains("still stuck"), "{e}");
        assert_eq!(secrets.failing().len(), 1);
        assert!(secrets.failing()[0].1.contains("did not answer"));
        // Released: the next read succeeds and clears the failure.
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let v = loop {
            match secrets.fetch(&r).await {
                Ok(v) => break v,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        secrets.record_success(&r, &v);
        assert!(secrets.failing().is_empty());
        assert!(secrets.for_snapshot(&r).is_some());
    }

    fn reference() -> SecretRef {
        SecretRef {
            provider: "fixed".into(),
            name: "openai-prod".into(),
            version: String::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_schedule_failures_and_last_good_value() {
        let provider = Arc::new(Fixed(Mutex::new(Ok("sk-first-value-0123456789".into()))));
        let secrets = Secrets::new(vec![provider.clone()], Duration::from_secs(300));
        let r = reference();
        let lead = Duration::from_secs(30);
        let retry = Duration::from_secs(30);
        assert!(secrets.due(&r, Instant::now(), lead, retry), "never read");

        let v = read(&secrets, &r).await.unwrap();
        assert_eq!(v.expose(), "sk-first-value-0123456789");
        assert!(!secrets.due(&r, Instant::now(), lead, retry));
        let status = secrets.status(&r).unwrap();
        assert!(status.last_refresh_time.is_some() && status.last_error.is_empty());

        // Due `lead` before the TTL runs out, not after.
        tokio::time::advance(Duration::from_secs(269)).await;
        assert!(!secrets.due(&r, Instant::now(), lead, retry));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(secrets.due(&r, Instant::now(), lead, retry));

        // A failed refresh keeps the last good value and shows the error (never the value).
        *provider.0.lock().unwrap() = Err(());
        let v = read(&secrets, &r).await.unwrap();
        assert_eq!(v.expose(), "sk-first-value-0123456789");
        let status = secrets.status(&r).unwrap();
        assert!(status.last_error.contains("openai-prod"), "{status:?}");
        assert!(!status.last_error.contains("sk-first"));
        assert!(
            !secrets.due(&r, Instant::now(), lead, retry),
            "retried after `retry`"
        );
        tokio::time::advance(retry).await;
        assert!(secrets.due(&r, Instant::now(), lead, retry));

        // The next good read clears the error; a changed value is reported as a change.
        *provider.0.lock().unwrap() = Ok("sk-second-value-0123456789".into());
        let v = secrets.fetch(&r).await.unwrap();
        assert_eq!(secrets.record_success(&r, &v), Read::Changed);
        assert_eq!(secrets.record_success(&r, &v), Read::Same);
        // What a snapshot holds is tracked apart from what was read.
        assert!(secrets.differs_from_applied(&r, &v));
        secrets.mark_applied(&r, &v);
        assert!(!secrets.differs_from_applied(&r, &v));
        assert_eq!(secrets.status(&r).unwrap().last_error, "");

        secrets.retain(&HashSet::new(), Instant::now());
        assert!(secrets.cached(&r).is_some(), "just resolved: kept");
        tokio::time::advance(RETAIN_GRACE + Duration::from_millis(1)).await;
        secrets.retain(&HashSet::new(), Instant::now());
        assert!(secrets.cached(&r).is_none() && secrets.status(&r).is_none());
    }

    #[tokio::test]
    async fn errors_map_to_the_admin_codes_naming_the_reference() {
        let secrets = Secrets::builtin(None, Duration::from_secs(60));
        let r = SecretRef {
            provider: "file".into(),
            name: "openai-prod".into(),
            version: "2".into(),
        };
        let e = secrets.fetch(&r).await.unwrap_err();
        match e.to_rule("secret_ref", &r) {
            RuleError::FailedPrecondition(m) => {
                assert!(
                    m.contains("\"file\"") && m.contains("openai-prod") && m.contains("\"2\""),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        let bad = SecretRef {
            provider: "env".into(),
            name: "../x".into(),
            version: String::new(),
        };
        let e = secrets.fetch(&bad).await.unwrap_err();
        assert!(matches!(
            e.to_rule("secret_ref", &bad),
            RuleError::Invalid(v) if v[0].field == "secret_ref.name"
        ));
    }
}

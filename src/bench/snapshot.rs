//! `keygate bench snapshot`: builds a snapshot of N synthetic keys in this process and reports
//! build time and resident bytes per key. Depends on `snapshot` (and its fixtures) and `crypto`.

use std::time::Instant;

use crate::crypto::MasterKey;
use crate::snapshot::Snapshot;
use crate::snapshot::fixtures::synthetic_update;

/// Resident set size of this process (Linux `/proc/self/statm`), in bytes.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Builds a snapshot of `n` synthetic keys and prints what it cost.
pub(super) fn run(n: u64) {
    let keys = MasterKey::generate().keys();
    let before = resident_bytes().unwrap_or(0);
    let update = synthetic_update(n);
    let with_update = resident_bytes().unwrap_or(0);
    let started = Instant::now();
    let snap = Snapshot::from_full(update, &keys).expect("synthetic update applies");
    let built = started.elapsed();
    let after = resident_bytes().unwrap_or(0);
    println!(
        "{n} keys: snapshot built in {:.3} s; resident {:.0} MB for the update records, {:.0} MB more after the build ({:.0} bytes/key for records + snapshot); {} keys indexed",
        built.as_secs_f64(),
        (with_update.saturating_sub(before)) as f64 / 1e6,
        (after.saturating_sub(with_update)) as f64 / 1e6,
        (after.saturating_sub(before)) as f64 / n.max(1) as f64,
        snap.counts().consumer_keys,
    );
}

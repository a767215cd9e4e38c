//! Snapshot build time and live heap per key at 10k / 100k / 1M consumer keys, the cost of
//! one incremental change at 1M keys, and the content digest's share of a full build (every
//! record hashed again). Run: `cargo bench --bench snapshot`.

use std::alloc::System;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group};
use keygate::crypto::MasterKey;
use keygate::snapshot::fixtures::synthetic_update;
use keygate::snapshot::{Snapshot, Update};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Heap bytes the snapshot holds per key: what dropping it frees (exact, from the allocator).
fn report_memory() {
    let keys = MasterKey::generate().keys();
    for n in [10_000u64, 100_000, 1_000_000] {
        let snap = Snapshot::from_full(synthetic_update(n), &keys).unwrap();
        let region = Region::new(GLOBAL);
        drop(black_box(snap));
        let freed = region.change().bytes_deallocated;
        println!(
            "snapshot memory: {n} keys hold {:.1} MB of heap, {:.0} bytes/key",
            freed as f64 / 1e6,
            freed as f64 / n as f64
        );
    }
}

fn build(c: &mut Criterion) {
    let keys = MasterKey::generate().keys();
    let mut g = c.benchmark_group("snapshot_build");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for n in [10_000u64, 100_000, 1_000_000] {
        let update = synthetic_update(n);
        g.bench_function(format!("full/{n}"), |b| {
            b.iter_batched(
                || update.clone(),
                |u| Snapshot::from_full(u, &keys).unwrap(),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();

    // One changed key on top of a 1M-key snapshot: cost proportional to the change.
    let base = Snapshot::from_full(synthetic_update(1_000_000), &keys).unwrap();
    let template = synthetic_update(1).keys.remove(0);
    let mut g = c.benchmark_group("snapshot_apply");
    g.bench_function("one_key_change/1000000", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let mut k = template.clone();
            k.0[..8].copy_from_slice(&i.to_be_bytes());
            let u = Update {
                store_id: base.store_id.clone(),
                version: base.version + 1,
                keys: vec![k],
                ..Default::default()
            };
            base.apply(u, &keys).unwrap()
        })
    });
    g.finish();

    // What the content digest adds to a full build of 1M keys: one hash per record.
    let mut g = c.benchmark_group("snapshot_digest");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("from_scratch/1000000", |b| {
        b.iter(|| black_box(base.digest_from_scratch()))
    });
    g.finish();
}

criterion_group!(benches, build);

fn main() {
    report_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

fn key(n: u128, model: &str) -> UsageKey {
    UsageKey {
        consumer_key: Uuid::from_u128(n),
        consumer: Some(Uuid::from_u128(100)),
        model_service: Uuid::from_u128(200),
        model: model.into(),
    }
}

fn counts(input: u64, output: u64) -> Counts {
    Counts {
        requests: 1,
        input_tokens: input,
        output_tokens: output,
        ..Counts::default()
    }
}

/// A sink that records what it was sent and fails while `down` is set.
fn recording_sink(down: Arc<AtomicBool>) -> (ReportSink, Arc<Mutex<Vec<Report>>>) {
    let sent: Arc<Mutex<Vec<Report>>> = Arc::default();
    let s = sent.clone();
    let sink: ReportSink = Arc::new(move |r| {
        s.lock().unwrap().push(r);
        let down = down.load(Ordering::SeqCst);
        Box::pin(async move {
            if down {
                Err("control plane down".into())
            } else {
                Ok(())
            }
        })
    });
    (sink, sent)
}

fn totals(reports: &[Report]) -> HashMap<UsageKey, Counts> {
    let mut all = HashMap::new();
    for r in reports {
        for (k, c) in &r.rows {
            all.entry(k.clone()).or_insert_with(Counts::default).add(c);
        }
    }
    all
}

#[test]
fn the_tally_sums_per_key_service_and_model() {
    let tally = Tally::default();
    tally.record(key(1, "gpt-4o"), counts(10, 5));
    tally.record(key(1, "gpt-4o"), counts(1, 2));
    tally.record(key(1, "gpt-4o-mini"), counts(7, 7));
    tally.record(key(2, ""), counts(0, 0));
    let mut got = HashMap::new();
    tally.drain_into(&mut got);
    assert_eq!(got.len(), 3);
    assert_eq!(got[&key(1, "gpt-4o")].requests, 2);
    assert_eq!(got[&key(1, "gpt-4o")].input_tokens, 11);
    assert_eq!(got[&key(1, "gpt-4o")].output_tokens, 7);
    let mut again = HashMap::new();
    tally.drain_into(&mut again);
    assert!(again.is_empty(), "a drain takes everything");
}

#[tokio::test]
async fn an_undelivered_report_is_sent_again_unchanged_and_later_usage_waits() {
    let tally = Arc::new(Tally::default());
    let down = Arc::new(AtomicBool::new(true));
    let (sink, sent) = recording_sink(down.clone());
    let mut reporter = Reporter::new(tally.clone(), sink);
    tally.record(key(1, "m"), counts(10, 1));
    assert!(!reporter.flush(Timestamp(1)).await);
    // More usage while the first report is outstanding.
    tally.record(key(1, "m"), counts(5, 5));
    assert!(!reporter.flush(Timestamp(2)).await);
    {
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0], sent[1], "the same report, same sequence and rows");
        assert_eq!(sent[0].sequence, 1);
    }
    down.store(false, Ordering::SeqCst);
    assert!(reporter.flush(Timestamp(3)).await);
    let sent = sent.lock().unwrap();
    // Report 1 again (acknowledged now), then report 2 with what waited.
    assert_eq!(sent.len(), 4);
    assert_eq!(sent[2].sequence, 1);
    assert_eq!(sent[3].sequence, 2);
    assert_eq!(sent[3].rows, vec![(key(1, "m"), counts(5, 5))]);
    assert!(sent.iter().all(|r| r.data_plane == reporter.data_plane()));
    // What the control plane applies (each sequence once) is exactly what was recorded.
    let mut applied: Vec<Report> = Vec::new();
    for r in sent.iter() {
        if applied.iter().all(|a| a.sequence != r.sequence) {
            applied.push(r.clone());
        }
    }
    let t = totals(&applied);
    assert_eq!(t[&key(1, "m")].requests, 2);
    assert_eq!(t[&key(1, "m")].input_tokens, 15);
    assert_eq!(reporter.pending_rows(), 0);
}

#[tokio::test]
async fn a_large_interval_is_split_into_reports_of_at_most_max_rows() {
    let tally = Arc::new(Tally::default());
    let (sink, sent) = recording_sink(Arc::new(AtomicBool::new(false)));
    let mut reporter = Reporter::new(tally.clone(), sink);
    let n = MAX_ROWS + 7;
    for i in 0..n {
        tally.record(key(i as u128, "m"), counts(1, 1));
    }
    assert!(reporter.flush(Timestamp(1)).await);
    let sent = sent.lock().unwrap();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].rows.len(), MAX_ROWS);
    assert_eq!(sent[1].rows.len(), 7);
    assert_eq!((sent[0].sequence, sent[1].sequence), (1, 2));
    assert_eq!(totals(&sent).len(), n);
}

#[tokio::test(start_paused = true)]
async fn the_task_reports_every_interval_and_delivers_at_shutdown() {
    let tally = Arc::new(Tally::default());
    let (sink, sent) = recording_sink(Arc::new(AtomicBool::new(false)));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = start_reporter(tally.clone(), sink, Duration::from_secs(1), async {
        let _ = stop_rx.await;
    });
    let handle = tokio::spawn(task);
    tally.record(key(1, "m"), counts(3, 4));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sent.lock().unwrap().len(), 1);
    tally.record(key(1, "m"), counts(1, 1));
    let _ = stop_tx.send(());
    handle.await.unwrap();
    let sent = sent.lock().unwrap();
    assert_eq!(sent.len(), 2, "the last usage is reported at shutdown");
    assert_eq!(totals(&sent)[&key(1, "m")].input_tokens, 4);
}

#[tokio::test]
async fn an_absurd_count_is_clamped_to_the_report_rules_never_dropping_the_report() {
    use crate::domain::usage::REPORT_MAX_COUNT;
    let tally = Arc::new(Tally::default());
    let (sink, sent) = recording_sink(Arc::new(AtomicBool::new(false)));
    let mut reporter = Reporter::new(tally.clone(), sink);
    tally.record(
        key(1, "m"),
        Counts {
            requests: 1,
            input_tokens: u64::MAX,
            output_tokens: u64::MAX,
            cached_input_tokens: u64::MAX,
            ..Counts::default()
        },
    );
    tally.record(key(2, "m"), counts(5, 6));
    assert!(reporter.flush(Timestamp(1)).await);
    let sent = sent.lock().unwrap();
    let report = sent[0].to_input();
    report
        .validate()
        .expect("a report within the store's rules");
    let t = totals(&sent);
    assert_eq!(t[&key(1, "m")].input_tokens, REPORT_MAX_COUNT);
    assert_eq!(
        t[&key(2, "m")],
        counts(5, 6),
        "the other rows travel unchanged"
    );
}

//! Budget exhaustion kept by the control plane (SPEC §8.3, issue 17) on both backends: the spend
//! a usage report brings to a budget is published as "exhausted until the period's end" on the
//! key or consumer (what the snapshot carries to every data plane), audited under
//! `keygate:budget`, once — refreshing the same spend again, from the same or another control
//! plane, changes nothing and spends no revision; raising a budget re-opens at once, lowering it
//! under the spend closes at once; a new period re-opens. On PostgreSQL two control planes
//! refreshing at once publish one change between them. Time is an input (`now`).

mod common;

use common::postgres::{Backend, fresh_postgres_database};
use keygate::crypto::MasterKey;
use keygate::domain::input::{
    ConsumerKeyPatch, KeySource, NewConsumer, NewConsumerKey, NewModelService,
};
use keygate::domain::limits::LimitsInput;
use keygate::domain::usage::{ModelPriceInput, UsageDelta, UsageReportInput};
use keygate::domain::{Limits, ResourceKind, Selector, Timestamp};
use keygate::store::{Actor, AuditFilter, BUDGET_ACTOR, PageRequest, Store};
use uuid::Uuid;

const DAY: i64 = 86_400_000_000;

on_both_backends!(
    a_spent_budget_is_published_once_until_the_period_end_and_reopens,
    a_consumer_budget_in_usd_closes_on_the_exact_cost,
    a_key_and_its_consumer_crossing_together_are_both_published_and_reopened,
);

struct Env {
    store: Store,
    url: String,
    master: MasterKey,
    _tmp: tempfile::TempDir,
}

impl Env {
    async fn start(backend: Backend) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}", tmp.path().join("budgets.db").display()),
            Backend::Postgres => fresh_postgres_database("kg_budgets").await,
        };
        let master = MasterKey::generate();
        let store = Self::open(&url, &master).await;
        Env {
            store,
            url,
            master,
            _tmp: tmp,
        }
    }

    async fn open(url: &str, master: &MasterKey) -> Store {
        Store::open(url, &master.fingerprint(), master.keys(), Limits::default())
            .await
            .unwrap()
    }

    /// `openai` pricing gpt-4o at 2.50 / 10 USD per million input / output tokens.
    async fn service(&self) -> Uuid {
        let s = self
            .store
            .create_model_service(
                &actor(),
                NewModelService {
                    name: "openai".into(),
                    provider: "openai".into(),
                    pricing: vec![ModelPriceInput {
                        model: "gpt-4o".into(),
                        input_per_mtok: "2.50".into(),
                        output_per_mtok: "10".into(),
                        cached_input_per_mtok: String::new(),
                    }],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        Uuid::parse_str(&s.id).unwrap()
    }

    async fn consumer(&self, name: &str, limits: LimitsInput) -> Uuid {
        let c = self
            .store
            .create_consumer(
                &actor(),
                NewConsumer {
                    name: name.into(),
                    description: String::new(),
                    scope: Default::default(),
                    limits,
                },
            )
            .await
            .unwrap();
        Uuid::parse_str(&c.id).unwrap()
    }

    async fn key(&self, name: &str, consumer: &str, limits: LimitsInput) -> Uuid {
        let k = self
            .store
            .create_consumer_key(
                &actor(),
                NewConsumerKey {
                    name: name.into(),
                    description: String::new(),
                    source: KeySource::Auto,
                    consumer: Some(consumer.into()),
                    scope: Default::default(),
                    ip_allowlist: vec![],
                    expire_time: None,
                    limits,
                },
            )
            .await
            .unwrap();
        Uuid::parse_str(&k.key.id).unwrap()
    }

    /// Applies a report of one row: `input` and `output` tokens of gpt-4o.
    async fn report(&self, seq: u64, row: (Uuid, Uuid, Uuid), tokens: (u64, u64), now: Timestamp) {
        let (key, consumer, service) = row;
        let r = UsageReportInput {
            data_plane: Uuid::from_u128(0xd1),
            sequence: seq,
            time: now,
            rows: vec![UsageDelta {
                consumer_key: key,
                consumer: Some(consumer),
                model_service: service,
                model: "gpt-4o".into(),
                requests: 1,
                error_responses: 0,
                unparsed: 0,
                input_tokens: tokens.0,
                output_tokens: tokens.1,
                cached_input_tokens: 0,
            }],
        };
        self.store.apply_usage_report(&r, now).await.unwrap();
    }

    /// The stored exhaustion of each key and consumer, as the snapshot builder reads it.
    async fn published(&self) -> (Vec<(String, Option<Timestamp>)>, i64) {
        let mut keys = Vec::new();
        let contents = self
            .store
            .load_contents(|k| {
                keys.push((k.name.clone(), k.budget_exhausted_until));
                Ok(())
            })
            .await
            .unwrap();
        keys.extend(
            contents
                .consumers
                .iter()
                .map(|c| (format!("consumer {}", c.name), c.budget_exhausted_until)),
        );
        keys.sort();
        (keys, contents.revision)
    }

    async fn exhausted(&self, name: &str) -> Option<Timestamp> {
        let (all, _) = self.published().await;
        all.into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is not in the store"))
            .1
    }
}

fn page() -> PageRequest {
    PageRequest {
        size: 50,
        after: None,
    }
}

fn actor() -> Actor {
    Actor("test".into())
}

fn token_budget(tokens: u64) -> LimitsInput {
    LimitsInput {
        budget_tokens: tokens,
        budget_period: 1, // DAY
        ..Default::default()
    }
}

/// The next UTC midnight after `t`.
fn next_midnight(t: Timestamp) -> Timestamp {
    Timestamp((t.0.div_euclid(DAY) + 1) * DAY)
}

async fn a_spent_budget_is_published_once_until_the_period_end_and_reopens(backend: Backend) {
    let env = Env::start(backend).await;
    let service = env.service().await;
    let app = env.consumer("app", LimitsInput::default()).await;
    let k = env.key("k", "app", token_budget(1000)).await;
    let free = env.key("free", "app", LimitsInput::default()).await;
    let now = Timestamp::now();
    let ids = [k.to_string(), free.to_string()];

    // 700 of 1,000 tokens: open; nothing changes, no revision is spent.
    env.report(1, (k, app, service), (400, 300), now).await;
    let (_, before) = env.published().await;
    assert!(
        env.store
            .refresh_budgets(&ids, &[], now)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(env.published().await.1, before, "no revision for no change");
    assert_eq!(env.exhausted("k").await, None);

    // 1,050: exhausted until the day's end (UTC), in one revision; the unbudgeted key and the
    // consumer are untouched.
    env.report(2, (k, app, service), (200, 150), now).await;
    let changes = env
        .store
        .refresh_budgets(&ids, &[app.to_string()], now)
        .await
        .unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].kind, ResourceKind::ConsumerKey);
    let until = next_midnight(now);
    assert_eq!(changes[0].exhausted_until, Some(until));
    let (published, revision) = env.published().await;
    assert_eq!(revision, before + 1);
    assert_eq!(
        published,
        vec![
            ("consumer app".into(), None),
            ("free".into(), None),
            ("k".into(), Some(until)),
        ]
    );
    // The audit trail says who stopped it and why, never a value.
    let events = env
        .store
        .list_audit_events(&AuditFilter::default(), &page())
        .await
        .unwrap()
        .items;
    let e = &events[0];
    assert_eq!(
        (e.actor.as_str(), e.action.as_str()),
        (BUDGET_ACTOR, "BudgetExhausted")
    );
    assert_eq!(e.resource_name, "k");
    assert!(e.details.contains("1050 tokens"), "{}", e.details);

    // Publishing twice does not matter: the same refresh again, here and from a second
    // control plane on the same store, changes nothing and spends no revision.
    let second = Env::open(&env.url, &env.master).await;
    assert!(
        env.store
            .refresh_budgets(&ids, &[], now)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        second
            .refresh_budgets(&ids, &[], now)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(env.published().await.1, revision);

    // Raising the budget re-opens at once (in the update's own revision)...
    let raise = |tokens| ConsumerKeyPatch {
        limits: Some(token_budget(tokens)),
        ..Default::default()
    };
    let sel = Selector::Name("k".into());
    env.store
        .update_consumer_key(&actor(), &sel, raise(5000))
        .await
        .unwrap();
    assert_eq!(env.exhausted("k").await, None);
    // ... and lowering it under the spend closes at once.
    env.store
        .update_consumer_key(&actor(), &sel, raise(1000))
        .await
        .unwrap();
    assert_eq!(
        env.exhausted("k").await,
        Some(next_midnight(Timestamp::now()))
    );

    // The next day the spend of the new period is nothing: re-opened (data planes already
    // allow from the instant; the store catches up at the next report of the key).
    let tomorrow = Timestamp(until.0 + 1);
    let changes = env
        .store
        .refresh_budgets(&ids, &[], tomorrow)
        .await
        .unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].exhausted_until, None);
    assert_eq!(env.exhausted("k").await, None);
    let events = env
        .store
        .list_audit_events(&AuditFilter::default(), &page())
        .await
        .unwrap()
        .items;
    assert_eq!(events[0].action, "BudgetReopened");

    // On PostgreSQL, two control planes refreshing the same new spend at once publish it
    // once between them (the revision row serialises them).
    if backend == Backend::Postgres {
        env.report(3, (k, app, service), (900, 200), tomorrow).await;
        let (a, b) = tokio::join!(
            env.store.refresh_budgets(&ids, &[], tomorrow),
            second.refresh_budgets(&ids, &[], tomorrow),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.len() + b.len(), 1, "{a:?} {b:?}");
        assert_eq!(env.exhausted("k").await, Some(next_midnight(tomorrow)));
    }
}

async fn a_consumer_budget_in_usd_closes_on_the_exact_cost(backend: Backend) {
    let env = Env::start(backend).await;
    let service = env.service().await;
    let team = env
        .consumer(
            "team",
            LimitsInput {
                budget_usd: "0.015".into(),
                budget_period: 4, // TOTAL
                ..Default::default()
            },
        )
        .await;
    let t1 = env.key("t1", "team", LimitsInput::default()).await;
    let t2 = env.key("t2", "team", LimitsInput::default()).await;
    let now = Timestamp::now();
    let consumers = [team.to_string()];
    // 2,000 input (0.005 USD) + 999 output (0.00999 USD) = 0.01499 USD: one hundred-thousandth
    // short of the budget.
    env.report(1, (t1, team, service), (2000, 999), now).await;
    let ids = [t1.to_string(), t2.to_string()];
    assert!(
        env.store
            .refresh_budgets(&ids, &consumers, now)
            .await
            .unwrap()
            .is_empty()
    );
    // One more output token from the other key: 0.015 exactly, the budget reached.
    env.report(2, (t2, team, service), (0, 1), now).await;
    let changes = env
        .store
        .refresh_budgets(&ids, &consumers, now)
        .await
        .unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].kind, ResourceKind::Consumer);
    // A TOTAL budget never ends: the latest instant there is.
    assert_eq!(changes[0].exhausted_until, Some(Timestamp(i64::MAX)));
    assert_eq!(
        env.exhausted("consumer team").await,
        Some(Timestamp(i64::MAX))
    );
    // Its keys carry no exhaustion of their own: the consumer's stops them all.
    assert_eq!(env.exhausted("t1").await, None);
    assert_eq!(env.exhausted("t2").await, None);
}

/// One report can spend a key's budget and its consumer's at once, and the next day re-opens
/// both: each is published (and audited) on its own.
async fn a_key_and_its_consumer_crossing_together_are_both_published_and_reopened(
    backend: Backend,
) {
    let env = Env::start(backend).await;
    let service = env.service().await;
    let team = env.consumer("team", token_budget(500)).await;
    let k = env.key("k", "team", token_budget(300)).await;
    let now = Timestamp::now();
    let (keys, consumers) = ([k.to_string()], [team.to_string()]);
    env.report(1, (k, team, service), (400, 200), now).await;
    let (_, before) = env.published().await;
    let changes = env
        .store
        .refresh_budgets(&keys, &consumers, now)
        .await
        .unwrap();
    assert_eq!(changes.len(), 2, "{changes:?}");
    let until = Some(next_midnight(now));
    assert_eq!(env.exhausted("k").await, until);
    assert_eq!(env.exhausted("consumer team").await, until);
    assert_eq!(env.published().await.1, before + 2, "a revision each");
    let tomorrow = Timestamp(next_midnight(now).0 + 1);
    let changes = env
        .store
        .refresh_budgets(&keys, &consumers, tomorrow)
        .await
        .unwrap();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(env.exhausted("k").await, None);
    assert_eq!(env.exhausted("consumer team").await, None);
    let actions: Vec<String> = env
        .store
        .list_audit_events(&AuditFilter::default(), &page())
        .await
        .unwrap()
        .items
        .into_iter()
        .take(4)
        .map(|e| format!("{} {}", e.action, e.resource_name))
        .collect();
    assert_eq!(
        actions,
        [
            "BudgetReopened k",
            "BudgetReopened team",
            "BudgetExhausted k",
            "BudgetExhausted team"
        ]
    );
}

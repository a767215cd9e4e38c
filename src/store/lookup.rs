//! Finding resources: a selector or a name-or-id resolved to a stored resource, name
//! uniqueness, what references a resource, and the one paging idiom every listing uses.
//! Depends on `domain`.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::model_services::service_references;
use super::rows::table_of;
use super::{Result, Store};
use crate::domain::{Named, ResourceKind, RuleError, SecretRef, Selector};

/// One page of a listing.
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<String>,
}

/// A page request: `after` is the opaque cursor from a previous page.
#[derive(Clone, Debug, Default)]
pub struct PageRequest {
    pub size: usize,
    pub after: Option<String>,
}

impl PageRequest {
    /// The cursor bound in `WHERE name > $1` (empty: from the start).
    pub(super) fn cursor(&self) -> String {
        self.after.clone().unwrap_or_default()
    }

    /// The `LIMIT`: one row more than the page, so a next page is known without a query.
    pub(super) fn limit(&self) -> i64 {
        self.size as i64 + 1
    }

    /// The page's rows (the extra row dropped) and whether more follow.
    pub(super) fn split(&self, mut rows: Vec<AnyRow>) -> (Vec<AnyRow>, bool) {
        let more = rows.len() > self.size;
        rows.truncate(self.size);
        (rows, more)
    }
}

impl<T> Page<T> {
    /// A page whose next page (when `more`) starts after its last item's `cursor`.
    pub(super) fn new(items: Vec<T>, more: bool, cursor: impl Fn(&T) -> String) -> Page<T> {
        let next = if more { items.last().map(cursor) } else { None };
        Page { items, next }
    }
}

/// The resource `sel` names, or `NOT_FOUND`.
pub(super) async fn find(
    conn: &mut sqlx::AnyConnection,
    kind: ResourceKind,
    sel: &Selector,
) -> Result<Named> {
    let (condition, value) = match sel {
        Selector::Id(v) => ("id = $1", v),
        Selector::Name(v) => ("name = $1", v),
        // An id wins over another resource's name that happens to be the same text.
        Selector::IdOrName(v) => (
            "id = $1 OR name = $1 ORDER BY CASE WHEN id = $1 THEN 0 ELSE 1 END",
            v,
        ),
    };
    let row = sqlx::query(&format!(
        "SELECT id, name FROM {} WHERE {condition}",
        table_of(kind)
    ))
    .bind(value)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(Named {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
        }),
        None => Err(RuleError::not_found(kind, sel).into()),
    }
}

/// The resource a request field names by name or id.
pub(super) async fn find_ref(
    conn: &mut sqlx::AnyConnection,
    kind: ResourceKind,
    name_or_id: &str,
) -> Result<Named> {
    find(conn, kind, &Selector::IdOrName(name_or_id.to_string())).await
}

/// Refuses `name` when another resource of `kind` (any but `except_id`) has it.
pub(super) async fn ensure_unique_name(
    conn: &mut sqlx::AnyConnection,
    kind: ResourceKind,
    name: &str,
    except_id: Option<&str>,
) -> Result<()> {
    let existing: Option<String> = sqlx::query_scalar(&format!(
        "SELECT id FROM {} WHERE name = $1",
        table_of(kind)
    ))
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    match existing {
        Some(id) if Some(id.as_str()) != except_id => Err(RuleError::AlreadyExists {
            kind,
            name: name.to_string(),
        }
        .into()),
        _ => Ok(()),
    }
}

impl Store {
    /// What references a resource: a key's consumer or services, a consumer's keys, a
    /// service's keys and the scopes naming it. Also the key's secret reference, if any.
    pub async fn references(
        &self,
        kind: ResourceKind,
        sel: &Selector,
    ) -> Result<(Vec<(ResourceKind, Named)>, Option<SecretRef>)> {
        fn of(kind: ResourceKind, list: Vec<Named>) -> Vec<(ResourceKind, Named)> {
            list.into_iter().map(|n| (kind, n)).collect()
        }
        Ok(match kind {
            ResourceKind::ConsumerKey => {
                let k = self.get_consumer_key(sel).await?;
                let consumer = k.consumer.into_iter().collect();
                (of(ResourceKind::Consumer, consumer), k.secret_ref)
            }
            ResourceKind::ModelKey => {
                let k = self.get_model_key(sel).await?;
                (
                    of(ResourceKind::ModelService, k.model_services),
                    k.secret_ref,
                )
            }
            ResourceKind::Consumer => {
                let c = self.get_consumer(sel).await?;
                (of(ResourceKind::ConsumerKey, c.consumer_keys), None)
            }
            ResourceKind::ModelService => {
                // One connection, taken only here: the getters above take their own.
                let mut conn = self.pool.acquire().await?;
                let service = find(&mut conn, kind, sel).await?;
                (service_references(&mut conn, &service.id).await?, None)
            }
            ResourceKind::AdminToken => {
                return Err(RuleError::invalid("kind", "admin tokens have no references").into());
            }
            ResourceKind::Store => {
                return Err(RuleError::invalid("kind", "the store has no references").into());
            }
        })
    }
}

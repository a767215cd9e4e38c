//! Metered usage on the snapshot API's `ReportUsage` (SPEC §8.2): a data plane's report as
//! it travels (`report_to_wire`) and as the control plane reads it back (`metered_from_wire`),
//! and what the control plane applies it with. Depends on `usage`, `domain` and the protos.

use std::future::Future;
use std::sync::Arc;

use tonic::Status;

use crate::proto::snapshot::v1 as pb;

/// A metered-usage report as it travels.
pub fn report_to_wire(r: &crate::usage::Report) -> pb::UsageReport {
    let id = |u: &uuid::Uuid| u.as_bytes().to_vec();
    pb::UsageReport {
        items: Vec::new(),
        data_plane_id: id(&r.data_plane),
        sequence: r.sequence,
        time_us: r.time.0,
        metered: r
            .rows
            .iter()
            .map(|(k, c)| pb::MeteredUsage {
                consumer_key_id: id(&k.consumer_key),
                consumer_id: k.consumer.as_ref().map(id).unwrap_or_default(),
                model_service_id: id(&k.model_service),
                model: k.model.clone(),
                requests: c.requests,
                error_responses: c.error_responses,
                unparsed: c.unparsed,
                input_tokens: c.input_tokens,
                output_tokens: c.output_tokens,
                cached_input_tokens: c.cached_input_tokens,
            })
            .collect(),
    }
}

/// Applies a data plane's metered-usage report (the store applies each (data plane,
/// sequence) once: `Ok` also for a report applied before).
pub type MeteredSink = Arc<
    dyn Fn(
            crate::domain::usage::UsageReportInput,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), MeteredError>> + Send>>
        + Send
        + Sync,
>;

/// Why a metered report was not applied.
#[derive(Debug)]
pub enum MeteredError {
    /// It breaks a rule (the message names the field): sending it again cannot help.
    Refused(String),
    /// The store could not apply it now: the data plane sends it again.
    Unavailable(String),
}

/// A metered-usage report off the wire; ids must be 16 bytes (the rest of the rules are the
/// store's).
pub fn metered_from_wire(
    r: pb::UsageReport,
) -> Result<crate::domain::usage::UsageReportInput, Status> {
    let id = |b: &[u8], field: &str| {
        uuid::Uuid::from_slice(b)
            .map_err(|_| Status::invalid_argument(format!("{field}: must be a 16-byte id")))
    };
    let mut rows = Vec::with_capacity(r.metered.len());
    for (i, m) in r.metered.into_iter().enumerate() {
        rows.push(crate::domain::usage::UsageDelta {
            consumer_key: id(&m.consumer_key_id, &format!("metered[{i}].consumer_key_id"))?,
            consumer: if m.consumer_id.is_empty() {
                None
            } else {
                Some(id(&m.consumer_id, &format!("metered[{i}].consumer_id"))?)
            },
            model_service: id(
                &m.model_service_id,
                &format!("metered[{i}].model_service_id"),
            )?,
            model: m.model,
            requests: m.requests,
            error_responses: m.error_responses,
            unparsed: m.unparsed,
            input_tokens: m.input_tokens,
            output_tokens: m.output_tokens,
            cached_input_tokens: m.cached_input_tokens,
        });
    }
    Ok(crate::domain::usage::UsageReportInput {
        data_plane: id(&r.data_plane_id, "data_plane_id")?,
        sequence: r.sequence,
        time: crate::domain::Timestamp(r.time_us),
        rows,
    })
}

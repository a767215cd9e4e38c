//! What data planes report to their control plane about use: each consumer key's last use
//! (`last_used`, SPEC Appendix A `last_used_time`) and the metered usage of every allowed
//! request (`metered`, SPEC §8.2: requests and tokens per consumer key, model service and
//! model), each summed on the data plane and sent in batches that never block a request.
//! Depends on `domain`, `snapshot` (key entries) and `authz::metering` (what a response gave).

mod last_used;
pub mod metered;

pub use last_used::{UsageRecorder, UsageSink, start};
pub use metered::{Counts, Report, ReportSink, Tally, UsageKey, UsageKeyRef};

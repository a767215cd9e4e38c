//! Benchmark tooling shipped in the binary (`keygate bench …`): a load generator for
//! `Authorization/Check` over gRPC (`load`, presenting the requests of `requests`), a null
//! ext_authz server (`null`: answers OK, does nothing: the ceiling of this architecture on a
//! machine), a seeder that loads many keys at once (`seed`), admin churn and propagation trials
//! (`churn`) and an in-memory snapshot build (`snapshot`). Depends on `server` (store, listeners,
//! errors), `config` (the subcommand's arguments), `snapshot` and the generated protos.

mod churn;
mod load;
mod null;
mod requests;
mod seed;
mod snapshot;

pub use crate::snapshot::fixtures::synthetic_update;
pub use load::{LoadConfig, LoadReport, run_load};
pub use null::{NullAuthz, serve_null};
pub use requests::{check_request, seeded_key};
pub use snapshot::resident_bytes;

use crate::config::BenchCommand;
use crate::server::StartError;

/// Runs one `keygate bench …` command.
pub async fn run(cmd: BenchCommand) -> Result<(), StartError> {
    match cmd {
        BenchCommand::Null { addr } => null::run(addr).await,
        BenchCommand::Seed(args) => seed::run(args).await,
        BenchCommand::Snapshot { keys } => {
            snapshot::run(keys);
            Ok(())
        }
        BenchCommand::Churn(args) => churn::run(args).await,
        BenchCommand::Load(args) => load::run(args).await,
    }
}

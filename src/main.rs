//! The `keygate` binary: parse configuration, start logging, run, map failure to an exit code.

use clap::Parser;
use keygate::config::{Cli, Command, LogFormat};

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 64,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keygate: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        let started = match cli.command {
            Command::Serve(args) => keygate::server::start(args).await,
            Command::ControlPlane(args) => keygate::server::start_control_plane(&args, None).await,
            Command::Authz(args) => keygate::server::start_authz(args).await,
            Command::Bench(cmd) => return keygate::bench::run(cmd).await,
        };
        keygate::server::run_until(started?, keygate::server::shutdown_signal()).await
    });
    if let Err(e) = result {
        tracing::error!(error = %e, "keygate failed to start");
        eprintln!("keygate: {e}");
        std::process::exit(e.exit_code());
    }
}

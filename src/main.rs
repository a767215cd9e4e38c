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
        match cli.command {
            Command::Serve(args) => {
                keygate::server::run(args, keygate::server::shutdown_signal()).await
            }
            Command::ControlPlane(args) => match keygate::server::start_control_plane(&args, None)
                .await
            {
                Ok(r) => keygate::server::run_until(r, keygate::server::shutdown_signal()).await,
                Err(e) => Err(e),
            },
            Command::Authz(args) => match keygate::server::start_authz(args).await {
                Ok(r) => keygate::server::run_until(r, keygate::server::shutdown_signal()).await,
                Err(e) => Err(e),
            },
            Command::Bench(cmd) => keygate::bench::run(cmd).await,
        }
    });
    if let Err(e) = result {
        tracing::error!(error = %e, "keygate failed to start");
        eprintln!("keygate: {e}");
        std::process::exit(e.exit_code());
    }
}

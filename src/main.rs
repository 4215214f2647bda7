//! The `creditd` binary: `serve`, `migrate`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use creditd::{
    app::App,
    config::{Config, Sources},
    demo,
    store::pg::PgStore,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "creditd", version, about = "Prepaid-credit gate for AI usage (gRPC)")]
struct Cli {
    /// Configuration file (TOML) layered over the embedded defaults.
    #[arg(long, global = true, env = "CREDITD_CONFIG")]
    config: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC until SIGINT or SIGTERM.
    Serve {
        /// Listen address (overrides server.listen).
        #[arg(long)]
        listen: Option<String>,
        /// Apply database migrations before serving.
        #[arg(long)]
        migrate: bool,
        /// Seed the demo tenant and make it the default tenant.
        #[arg(long)]
        demo: bool,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Print the effective configuration's defaults file and exit.
    DefaultConfig,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut overrides = Vec::new();
    if let Command::Serve { listen, migrate, demo } = &cli.command {
        if let Some(listen) = listen {
            overrides.push(("server.listen".to_string(), listen.clone()));
        }
        if *migrate {
            overrides.push(("postgres.migrate_on_start".to_string(), "true".to_string()));
        }
        if *demo {
            overrides.push(("server.default_tenant".to_string(), demo::TENANT.to_string()));
        }
    }
    if let Command::DefaultConfig = cli.command {
        print!("{}", include_str!("default.toml"));
        return ExitCode::SUCCESS;
    }
    let sources = Sources { file: cli.config.clone(), env: std::env::vars().collect(), overrides };
    let config = match Config::load(&sources) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("creditd: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config);
    match run(cli.command, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "creditd stopped with an error");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Migrate => {
            let pg = PgStore::connect(&config.postgres.url, 2, config.postgres.statement_timeout).await?;
            pg.migrate().await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Serve { demo: seed_demo, .. } => {
            let max_depth = config.hot.max_depth;
            let app = App::build(config).await?;
            if seed_demo {
                demo::seed(app.engine(), max_depth).await?;
                tracing::info!(tenant = demo::TENANT, "demo tenant seeded (accounts acme, alice, bob)");
            }
            tracing::info!(addr = %app.local_addr(), "listening");
            app.serve(shutdown_signal()).await?;
            Ok(())
        }
        Command::DefaultConfig => Ok(()),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

fn init_tracing(config: &Config) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

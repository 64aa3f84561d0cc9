//! The command line: global endpoints and one subcommand per job.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::{api::Ingest, bench, bench_live, credentials::Credentials, simulate, watch};

#[derive(Parser, Debug)]
#[command(
    name = "pbx",
    version,
    about = "Drive, watch and load Switchboard from a terminal.",
    long_about = "Drive, watch and load Switchboard from a terminal.\n\n\
        `pbx simulate` streams realistic calls through ingest and follows them to the end on \
        the notifier; `pbx watch` follows calls live; `pbx bench` loads ingest and measures it; `pbx bench-live` measures the notifier's fan-out; `pbx status`, `pbx calls` and `pbx retry` \
        wrap the ingest API. Start the stack first with ./scripts/up."
)]
pub struct Cli {
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Endpoints {
    /// Base URL of the ingest API.
    #[arg(
        long,
        global = true,
        env = "PBX_INGEST_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub ingest_url: String,
    /// Base URL of the notifier (http:// or ws://).
    #[arg(
        long,
        global = true,
        env = "PBX_NOTIFIER_URL",
        default_value = "http://127.0.0.1:8082"
    )]
    pub notifier_url: String,
    /// The key sent to stream and complete calls (a `pbx` or `admin` key). Unset, against
    /// the local stack: read from `.run/keys.env` (written by ./scripts/up).
    #[arg(long, global = true, env = "PBX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The key sent to read calls and watch them live (a `supervisor` or `admin` key);
    /// defaults to the API key.
    #[arg(
        long,
        global = true,
        env = "PBX_SUPERVISOR_KEY",
        hide_env_values = true
    )]
    pub supervisor_key: Option<String>,
}

impl Endpoints {
    pub fn credentials(&self) -> Credentials {
        Credentials::resolve(
            self.api_key.as_deref(),
            self.supervisor_key.as_deref(),
            &self.ingest_url,
        )
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Stream N realistic calls (JSON API, Twilio, AudioSocket or L16), end them, follow them
    /// to ARCHIVED or FAILED, check what ingest stored (audio included), summarise.
    Simulate(simulate::Options),
    /// Follow calls live on the notifier, one line per change.
    Watch(watch::Options),
    /// Load ingest at a fixed rate (open loop) or flat out (`--closed`); report throughput,
    /// latency percentiles and errors by status.
    Bench(bench::Options),
    /// Open many WebSockets on the notifier, start calls through ingest one at a time, and
    /// report how long each event took to reach every socket.
    BenchLive(bench_live::Options),
    /// Show one call: state, counts, missing ranges, AI results, history.
    Status {
        /// The call id.
        call_id: String,
        /// Print the API's JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// List calls, newest first.
    Calls {
        /// Only calls in this state (IN_PROGRESS, COMPLETED, PROCESSING_AI, ARCHIVED, FAILED).
        #[arg(long)]
        state: Option<String>,
        /// How many (1-500).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print the API's JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Re-drive a FAILED call through the AI (FAILED -> COMPLETED).
    Retry {
        /// The call id.
        call_id: String,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ingest = Ingest::new(&cli.endpoints.ingest_url, cli.endpoints.credentials())?;
    match cli.command {
        Command::Simulate(options) => simulate::run(&ingest, &cli.endpoints, options).await,
        Command::Watch(options) => watch::run(&cli.endpoints, options).await,
        Command::Bench(options) => bench::run(&ingest, options).await,
        Command::BenchLive(options) => bench_live::run(&ingest, &cli.endpoints, options).await,
        Command::Status { call_id, json } => {
            let call = ingest.call(&call_id).await?;
            if json {
                println!("{}", self::json(&call, true)?);
            } else {
                print!("{}", watch::describe_call(&call));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Calls { state, limit, json } => {
            let page = ingest.calls(state.as_deref(), limit).await?;
            if json {
                println!("{}", self::json(&page, true)?);
            } else {
                print!("{}", watch::describe_calls(&page));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry { call_id } => {
            let call = ingest.retry(&call_id).await?;
            println!(
                "{call_id}: {} (attempts reset; the transcriber will pick it up)",
                call.state
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What `--json` prints: the value as JSON, its keys sorted, as pbx has always printed them
/// (it printed `serde_json::Value`s, whose objects are sorted maps). `pretty` spreads it over
/// lines.
pub fn json(value: &impl serde::Serialize, pretty: bool) -> anyhow::Result<String> {
    let value = serde_json::to_value(value)?;
    Ok(if pretty {
        serde_json::to_string_pretty(&value)?
    } else {
        value.to_string()
    })
}

//! `chaos`: Switchboard's fault-injection matrix (`scripts/chaos` builds and runs it). Each
//! scenario starts the release binaries on a database and subject prefix of its own, against a
//! Postgres and a NATS of the run's own (so they can be stopped), drives load as a PBX does,
//! injects one fault, and checks the books. Exits 1 when any promise broke.

mod ai;
mod books;
mod infra;
mod load;
mod report;
mod scenarios;
mod stack;

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "chaos",
    about = "Faults under load against the real binaries, then the books."
)]
struct Cli {
    /// Scenarios to run, by number (default: all ten; with --ci: 1,2,4,5,10).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<u8>,
    /// The reduced matrix CI runs: fewer calls, shorter faults.
    #[arg(long)]
    ci: bool,
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Where the run's servers keep their data and the services their logs.
    #[arg(long, default_value = ".run/chaos")]
    run_dir: PathBuf,
    /// Write the results table into this Markdown file (between its chaos markers).
    #[arg(long)]
    write_doc: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    common::tls::install_crypto_provider();
    let scenarios = match (cli.scenarios.is_empty(), cli.ci) {
        (false, _) => cli.scenarios.clone(),
        (true, true) => vec![1, 2, 4, 5, 10],
        (true, false) => (1..=10).collect(),
    };
    let scale = if cli.ci {
        scenarios::Scale::ci()
    } else {
        scenarios::Scale::full()
    };
    let run_dir = std::path::absolute(&cli.run_dir)?;
    std::fs::create_dir_all(&run_dir)?;
    let started = std::time::Instant::now();
    let mut run = scenarios::Run {
        bin_dir: std::path::absolute(&cli.bin_dir)?,
        postgres: infra::Postgres::create(&run_dir)?,
        nats: infra::Nats::create(&run_dir)?,
        run_dir,
        scale,
    };
    let mut outcomes = Vec::new();
    for number in scenarios {
        eprintln!("chaos: scenario {number} …");
        let outcome = scenarios::run(&mut run, number).await;
        eprintln!("{}", report::line(&outcome));
        outcomes.push(outcome);
    }
    let elapsed = started.elapsed();
    let table = report::table(&outcomes, cli.ci, elapsed);
    println!("{table}");
    std::fs::write(
        run.run_dir.join("results.json"),
        serde_json::to_string_pretty(&outcomes)?,
    )?;
    if let Some(path) = &cli.write_doc {
        report::write_doc(path, &table)?;
    }
    Ok(if outcomes.iter().all(scenarios::Outcome::held) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

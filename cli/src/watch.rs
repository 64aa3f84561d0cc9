//! `pbx watch`, and the human-readable renderings `status` and `calls` share with it.

use std::{fmt::Write as _, io::IsTerminal, process::ExitCode, time::Duration};

use serde_json::Value;

use crate::{cli::Endpoints, live::Live};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Only this call (repeat for several).
    #[arg(long = "call")]
    pub calls: Vec<String>,
    /// Print each frame as JSON, one per line.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(endpoints: &Endpoints, options: Options) -> anyhow::Result<ExitCode> {
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut live = Live::new(&endpoints.notifier_url);
    live.connect(&options.calls).await?;
    loop {
        let Some(frame) = live.next().await else {
            eprintln!("pbx: the notifier went away; reconnecting…");
            live.reconnect(Duration::from_secs(300)).await?;
            continue;
        };
        if options.json {
            println!("{frame}");
            continue;
        }
        match frame["type"].as_str() {
            Some("snapshot") => {
                let calls = frame["calls"].as_array().cloned().unwrap_or_default();
                let what = if frame["reset"] == true {
                    "fresh snapshot"
                } else {
                    "snapshot"
                };
                let total = frame["total"].as_u64().unwrap_or(calls.len() as u64);
                println!(
                    "── {what}: {total} calls (seq {}), newest first",
                    frame["seq"]
                );
                for call in &calls {
                    println!("{}", line(call, colour));
                }
                if frame["more"] != true {
                    println!("── live");
                }
            }
            Some("snapshot_page") => {
                for call in frame["calls"].as_array().into_iter().flatten() {
                    println!("{}", line(call, colour));
                }
                if frame["more"] != true {
                    println!("── live");
                }
            }
            Some("status") => println!("{}", line(&frame, colour)),
            Some("progress") => {} // packet counts between changes: too chatty for a log
            Some("lagged") => println!(
                "── fell behind ({} events); resynchronising",
                frame["missed"]
            ),
            Some("error") => eprintln!("pbx: notifier says: {}", frame["message"]),
            _ => {}
        }
    }
}

fn paint(state: &str, colour: bool) -> String {
    if !colour {
        return state.to_owned();
    }
    let code = match state {
        "IN_PROGRESS" => "34",
        "COMPLETED" => "37",
        "PROCESSING_AI" => "33",
        "ARCHIVED" => "32",
        "FAILED" => "31",
        _ => "0",
    };
    format!("\x1b[{code}m{state}\x1b[0m")
}

/// One readable line per status event.
pub fn line(e: &Value, colour: bool) -> String {
    let state = e["state"].as_str().unwrap_or("?");
    let mut out = format!(
        "{}  {:<24} {:<13} v{:<3} packets {:<6} missing {:<4} attempts {}",
        e["at"]
            .as_str()
            .and_then(|t| t.get(11..19))
            .unwrap_or("--:--:--"),
        e["call_id"].as_str().unwrap_or("?"),
        paint(state, colour),
        e["version"],
        e["packets_received"],
        e["missing_packets"],
        e["ai_attempts"],
    );
    if let Some(reason) = e["reason"].as_str() {
        let _ = write!(out, "  ({reason})");
    }
    if let Some(error) = e["last_error"].as_str().filter(|_| state != "ARCHIVED") {
        let _ = write!(out, "  error: {error}");
    }
    if let Some(next) = e["next_attempt_at"].as_str() {
        let _ = write!(out, "  next try {}", next.get(11..19).unwrap_or(next));
    }
    if let Some(label) = e["sentiment"]["label"].as_str() {
        let _ = write!(
            out,
            "  {label} {:+.2}",
            e["sentiment"]["score"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(t) = e["transcript"].as_str() {
        let short: String = t.chars().take(60).collect();
        let _ = write!(
            out,
            "  \"{short}{}\"",
            if t.chars().count() > 60 { "…" } else { "" }
        );
    }
    out
}

/// `pbx status`: a call, readably.
pub fn describe_call(c: &Value) -> String {
    let mut out = String::new();
    let missing: Vec<String> = c["missing"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            if r["from"] == r["to"] {
                r["from"].to_string()
            } else {
                format!("{}-{}", r["from"], r["to"])
            }
        })
        .collect();
    let _ = writeln!(out, "call        {}", c["call_id"].as_str().unwrap_or("?"));
    let _ = writeln!(
        out,
        "state       {} (version {})",
        c["state"].as_str().unwrap_or("?"),
        c["version"]
    );
    let _ = writeln!(
        out,
        "packets     {} received, sequences {}..{}{}",
        c["packets_received"],
        c["first_sequence"],
        c["last_sequence"],
        c["total_packets"]
            .as_i64()
            .map(|t| format!(" of {t} declared"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "missing     {}{}",
        c["missing_packets"],
        if missing.is_empty() {
            String::new()
        } else {
            format!(" ({})", missing.join(", "))
        }
    );
    let _ = writeln!(out, "AI attempts {}", c["ai_attempts"]);
    if let Some(e) = c["last_error"].as_str() {
        let _ = writeln!(out, "last error  {e}");
    }
    if let Some(label) = c["sentiment"]["label"].as_str() {
        let _ = writeln!(
            out,
            "sentiment   {label} ({:+.2})",
            c["sentiment"]["score"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(t) = c["transcript"].as_str() {
        let _ = writeln!(out, "transcript  {t}");
    }
    let _ = writeln!(out, "history");
    for h in c["history"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  v{:<3} {}  {} -> {}  ({})",
            h["version"],
            h["at"].as_str().unwrap_or(""),
            h["from_state"].as_str().unwrap_or("·"),
            h["to_state"].as_str().unwrap_or("?"),
            h["reason"].as_str().unwrap_or("")
        );
    }
    out
}

/// `pbx calls`: a table.
pub fn describe_calls(page: &Value) -> String {
    let mut out = format!(
        "{:<28} {:<13} {:>8} {:>8} {:>8}  {}\n",
        "CALL", "STATE", "PACKETS", "MISSING", "ATTEMPTS", "UPDATED"
    );
    for c in page["calls"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<28} {:<13} {:>8} {:>8} {:>8}  {}",
            c["call_id"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?"),
            c["packets_received"],
            c["missing_packets"],
            c["ai_attempts"],
            c["updated_at"].as_str().unwrap_or("")
        );
    }
    if let Some(cursor) = page["next_cursor"].as_str() {
        let _ = writeln!(out, "(more: GET /v1/calls?cursor={cursor})");
    }
    out
}

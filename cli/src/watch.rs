//! `pbx watch`, and the human-readable renderings `status` and `calls` share with it.

use std::{fmt::Write as _, io::IsTerminal, process::ExitCode, time::Duration};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use wire::{
    CallState,
    api::{CallDetail, CallPage},
    events::StatusEvent,
    live::LiveFrame,
};

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
            println!("{}", crate::cli::json(&frame, false)?);
            continue;
        }
        match frame {
            LiveFrame::Snapshot(snapshot) => {
                let what = if snapshot.reset {
                    "fresh snapshot"
                } else {
                    "snapshot"
                };
                println!(
                    "── {what}: {} calls (seq {}), newest first",
                    snapshot.total, snapshot.seq
                );
                for call in &snapshot.calls {
                    println!("{}", line(&call.event, colour));
                }
                if !snapshot.more {
                    println!("── live");
                }
            }
            LiveFrame::SnapshotPage(page) => {
                for call in &page.calls {
                    println!("{}", line(&call.event, colour));
                }
                if !page.more {
                    println!("── live");
                }
            }
            LiveFrame::Status(status) => println!("{}", line(&status.event, colour)),
            // Packet counts between changes: too chatty for a log.
            LiveFrame::Progress(_) | LiveFrame::Heartbeat { .. } | LiveFrame::Unknown => {}
            LiveFrame::Lagged { missed } => {
                println!("── fell behind ({missed} events); resynchronising")
            }
            LiveFrame::Error { message } => eprintln!("pbx: notifier says: {message:?}"),
        }
    }
}

fn paint(state: CallState, colour: bool) -> String {
    let name = state.as_str();
    if !colour {
        return name.to_owned();
    }
    let code = match state {
        CallState::InProgress => "34",
        CallState::Completed => "37",
        CallState::ProcessingAi => "33",
        CallState::Archived => "32",
        CallState::Failed => "31",
    };
    format!("\x1b[{code}m{name}\x1b[0m")
}

/// A time as the API writes it (RFC 3339).
fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// `hh:mm:ss` of a time, in the offset it came with (UTC from Switchboard).
fn clock(at: OffsetDateTime) -> String {
    format!("{:02}:{:02}:{:02}", at.hour(), at.minute(), at.second())
}

/// An optional number as JSON would write it.
fn number(n: Option<i64>) -> String {
    n.map_or_else(|| "null".to_owned(), |n| n.to_string())
}

/// One readable line per status event.
pub fn line(e: &StatusEvent, colour: bool) -> String {
    let mut out = format!(
        "{}  {:<24} {:<13} v{:<3} packets {:<6} missing {:<4} attempts {}",
        clock(e.at),
        e.call_id.as_str(),
        paint(e.state, colour),
        e.version,
        e.packets_received,
        e.missing_packets,
        e.ai_attempts,
    );
    let _ = write!(out, "  ({})", e.reason);
    if let Some(error) = e
        .last_error
        .as_deref()
        .filter(|_| e.state != CallState::Archived)
    {
        let _ = write!(out, "  error: {error}");
    }
    if let Some(next) = e.next_attempt_at {
        let _ = write!(out, "  next try {}", clock(next));
    }
    if let Some(sentiment) = &e.sentiment {
        let _ = write!(out, "  {} {:+.2}", sentiment.label, sentiment.score);
    }
    if let Some(t) = &e.transcript {
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
pub fn describe_call(detail: &CallDetail) -> String {
    let c = &detail.call;
    let mut out = String::new();
    let missing: Vec<String> = detail
        .missing
        .iter()
        .map(|r| {
            if r.from == r.to {
                r.from.to_string()
            } else {
                format!("{}-{}", r.from, r.to)
            }
        })
        .collect();
    let _ = writeln!(out, "call        {}", c.call_id);
    let _ = writeln!(out, "state       {} (version {})", c.state, c.version);
    let _ = writeln!(
        out,
        "packets     {} received, sequences {}..{}{}",
        c.packets_received,
        number(c.first_sequence),
        number(c.last_sequence),
        c.total_packets
            .map(|t| format!(" of {t} declared"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "missing     {}{}",
        c.missing_packets,
        if missing.is_empty() {
            String::new()
        } else {
            format!(" ({})", missing.join(", "))
        }
    );
    let _ = writeln!(out, "AI attempts {}", c.ai_attempts);
    if let Some(e) = &c.last_error {
        let _ = writeln!(out, "last error  {e}");
    }
    if let Some(sentiment) = &c.sentiment {
        let _ = writeln!(
            out,
            "sentiment   {} ({:+.2})",
            sentiment.label, sentiment.score
        );
    }
    if let Some(t) = &c.transcript {
        let _ = writeln!(out, "transcript  {t}");
    }
    let _ = writeln!(out, "history");
    for h in &detail.history {
        let _ = writeln!(
            out,
            "  v{:<3} {}  {} -> {}  ({})",
            h.version,
            rfc3339(h.at),
            h.from_state.as_deref().unwrap_or("·"),
            h.to_state,
            h.reason
        );
    }
    out
}

/// `pbx calls`: a table.
pub fn describe_calls(page: &CallPage) -> String {
    let mut out = format!(
        "{:<28} {:<13} {:>8} {:>8} {:>8}  {}\n",
        "CALL", "STATE", "PACKETS", "MISSING", "ATTEMPTS", "UPDATED"
    );
    for c in &page.calls {
        let _ = writeln!(
            out,
            "{:<28} {:<13} {:>8} {:>8} {:>8}  {}",
            c.call_id,
            c.state.as_str(),
            c.packets_received,
            c.missing_packets,
            c.ai_attempts,
            rfc3339(c.updated_at)
        );
    }
    if let Some(cursor) = &page.next_cursor {
        let _ = writeln!(out, "(more: GET /v1/calls?cursor={cursor})");
    }
    out
}

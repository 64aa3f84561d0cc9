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
    let mut live = Live::new(&endpoints.notifier_url, endpoints.credentials().read);
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

#[cfg(test)]
mod tests {
    use super::*;

    const DETAIL: &str = r#"{"call_id":"c1","state":"ARCHIVED","version":4,"packets_received":6,"first_sequence":0,"last_sequence":9,"total_packets":10,"missing_packets":4,"ai_attempts":1,"transcript":"hello there","sentiment":{"label":"positive","score":0.5},"last_error":null,"created_at":"2025-11-25T16:00:00.123456Z","updated_at":"2025-11-25T16:00:01Z","last_packet_at":"2025-11-25T16:00:00.5Z","completed_at":"2025-11-25T16:00:00.9Z","next_attempt_at":null,"missing":[{"from":2,"to":2},{"from":5,"to":7}],"history":[{"version":1,"from_state":null,"to_state":"IN_PROGRESS","reason":"first_packet","at":"2025-11-25T16:00:00.123456Z"}]}"#;

    #[test]
    fn a_call_reads_with_its_ranges_sentiment_and_history() {
        let detail: CallDetail = serde_json::from_str(DETAIL).unwrap();
        let text = describe_call(&detail);
        assert!(text.contains("state       ARCHIVED (version 4)"), "{text}");
        assert!(text.contains("sequences 0..9 of 10 declared"), "{text}");
        assert!(text.contains("missing     4 (2, 5-7)"), "{text}");
        assert!(text.contains("sentiment   positive (+0.50)"), "{text}");
        assert!(
            text.contains("2025-11-25T16:00:00.123456Z  · -> IN_PROGRESS  (first_packet)"),
            "{text}"
        );
    }

    #[test]
    fn a_status_line_shows_the_clock_state_and_reason() {
        let event: StatusEvent = serde_json::from_str(
            r#"{"call_id":"c1","state":"FAILED","previous_state":"PROCESSING_AI","version":5,"at":"2025-11-25T16:04:05.5Z","reason":"ai_gave_up","packets_received":3,"missing_packets":0,"ai_attempts":5,"last_error":"boom","transcript":null,"sentiment":null,"next_attempt_at":null}"#,
        )
        .unwrap();
        let text = line(&event, false);
        assert!(text.starts_with("16:04:05  c1 "), "{text}");
        assert!(text.contains(" FAILED "), "{text}");
        assert!(text.ends_with("(ai_gave_up)  error: boom"), "{text}");
    }
}

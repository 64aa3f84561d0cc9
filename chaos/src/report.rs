//! The results as the table `docs/reliability.md` shows.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Context;

use crate::scenarios::Outcome;

const BEGIN: &str = "<!-- chaos:begin";
const END: &str = "<!-- chaos:end -->";

/// One line per scenario for the terminal.
pub fn line(o: &Outcome) -> String {
    let verdict = if o.held() { "held" } else { "BROKEN" };
    let mut line = format!(
        "chaos: {:>2} {verdict} in {:.0} s: {}",
        o.number, o.seconds, o.fault
    );
    for broken in &o.broken {
        let _ = write!(line, "\n      broken: {broken}");
    }
    line
}

pub fn table(outcomes: &[Outcome], ci: bool, elapsed: Duration) -> String {
    let mut t = String::new();
    let scale = if ci {
        "scripts/chaos --ci"
    } else {
        "scripts/chaos"
    };
    let _ = writeln!(
        t,
        "Run: `{scale}`, {} scenarios in {:.1} min.\n",
        outcomes.len(),
        elapsed.as_secs_f64() / 60.0
    );
    t.push_str("| # | fault, during load | must hold | packets acked / lost / not in JetStream / in JetStream twice | calls final / completed (failed) | transcribed twice | figures | held |\n");
    t.push_str("|---|---|---|---|---|---|---|---|\n");
    for o in outcomes {
        let (packets, calls, twice) = match &o.books {
            Some(b) => (
                format!(
                    "{} / {} / {} / {}",
                    b.packets_acknowledged,
                    b.packets_lost,
                    b.packets_unpublished,
                    b.packets_published_twice
                ),
                format!(
                    "{} / {} ({})",
                    b.calls_archived + b.calls_failed,
                    b.calls_completed,
                    b.calls_failed
                ),
                b.calls_transcribed_twice.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let figures: Vec<String> = o.figures.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let held = if o.held() {
            "yes".to_owned()
        } else {
            format!("**no**: {}", o.broken.join("; "))
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {packets} | {calls} | {twice} | {} | {held} |",
            o.number,
            o.fault,
            o.promise,
            figures.join("; ")
        );
    }
    t
}

/// Replaces what is between the chaos markers of `path` with `table`.
pub fn write_doc(path: &Path, table: &str) -> anyhow::Result<()> {
    let doc =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let begin = doc.find(BEGIN).context("no `<!-- chaos:begin` marker")?;
    let begin = begin + doc[begin..].find("-->").context("unclosed marker")? + 3;
    let end = doc.find(END).context("no `<!-- chaos:end -->` marker")?;
    let updated = format!("{}\n{}\n{}", &doc[..begin], table.trim_end(), &doc[end..]);
    std::fs::write(path, updated)?;
    Ok(())
}

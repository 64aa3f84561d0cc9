//! Which keys `pbx` sends. `PBX_API_KEY` (or `--api-key`) streams and completes calls;
//! `PBX_SUPERVISOR_KEY` reads them and watches the live view, and defaults to `PBX_API_KEY`
//! (enough when that is an `admin` key). Against the local stack (ingest on 127.0.0.1 or
//! localhost) with neither set, both come from `.run/keys.env`, which `./scripts/up` writes,
//! found in the current directory or the nearest parent that has one.

use std::path::{Path, PathBuf};

/// Where `./scripts/up` writes the development tenant's keys, from the repository's root.
const LOCAL_KEYS_FILE: &str = ".run/keys.env";

#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Sent to stream packets and complete calls.
    pub stream: Option<String>,
    /// Sent to read calls, re-drive them and watch the live view.
    pub read: Option<String>,
}

impl Credentials {
    pub fn resolve(
        api_key: Option<&str>,
        supervisor_key: Option<&str>,
        ingest_url: &str,
    ) -> Credentials {
        let given = |k: Option<&str>| {
            k.map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
        };
        let (stream, read) = (given(api_key), given(supervisor_key));
        if stream.is_none()
            && read.is_none()
            && is_local(ingest_url)
            && let Some(file) = find_keys_file(&std::env::current_dir().unwrap_or_default())
        {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            return Credentials {
                stream: value_of(&text, "PBX_API_KEY"),
                read: value_of(&text, "PBX_SUPERVISOR_KEY"),
            };
        }
        Credentials {
            read: read.or_else(|| stream.clone()),
            stream,
        }
    }
}

fn is_local(url: &str) -> bool {
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    matches!(host, "127.0.0.1" | "localhost")
}

fn find_keys_file(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|dir| dir.join(LOCAL_KEYS_FILE))
        .find(|file| file.is_file())
}

/// `NAME=value` from an env file (no quoting: keys are URL-safe).
fn value_of(text: &str, name: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_supervisor_key_defaults_to_the_api_key() {
        let c = Credentials::resolve(Some("sbk_a"), None, "https://ingest.example.com");
        assert_eq!(c.stream.as_deref(), Some("sbk_a"));
        assert_eq!(c.read.as_deref(), Some("sbk_a"));
        let c = Credentials::resolve(Some("sbk_a"), Some("sbk_b"), "https://ingest.example.com");
        assert_eq!(c.read.as_deref(), Some("sbk_b"));
        let c = Credentials::resolve(None, None, "https://ingest.example.com");
        assert!(c.stream.is_none() && c.read.is_none());
    }

    #[test]
    fn local_urls_and_env_files_are_read() {
        assert!(is_local("http://127.0.0.1:8080"));
        assert!(is_local("http://localhost:8080/"));
        assert!(!is_local("https://ingest.example.com"));
        let text = "# written by scripts/up\nPBX_API_KEY=sbk_x\nPBX_SUPERVISOR_KEY=\"sbk_y\"\n";
        assert_eq!(value_of(text, "PBX_API_KEY").as_deref(), Some("sbk_x"));
        assert_eq!(
            value_of(text, "PBX_SUPERVISOR_KEY").as_deref(),
            Some("sbk_y")
        );
        assert_eq!(value_of(text, "OTHER"), None);
    }
}

//! `cargo xtask fetch-references --root-url URL [--out DIR]`: downloads a
//! deployment's exchange references and the message schemas they need.
//!
//! Reads `URL/references/manifest.json`, fetches every `exchanges.json` it
//! lists (API and log references are skipped), then each entry's message
//! schema and, transitively, every schema a `$ref` leads to. Everything is
//! fetched and validated in memory first; only then are the files written in
//! the references layout (`<service>/v1/exchanges.json`, `<service>/v1/<schema>.json`)
//! as JSON with sorted keys.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use exchange_codegen::load::parse_reference;
use exchange_codegen::resolve::{join_uri, normalize_id, schema_refs};
use exchange_codegen::schema_files::canonical_json;
use serde_json::Value;

use crate::Failure;
use crate::regenerate::{Change, ensure_file_contents};

/// Downloads documents from one deployment.
struct Fetcher {
    agent: ureq::Agent,
    root_url: String,
}

impl Fetcher {
    fn new(root_url: &str) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .build();
        Fetcher {
            agent: config.into(),
            root_url: root_url.trim_end_matches('/').to_owned(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.root_url)
    }

    /// GETs `path` (below the root URL) as JSON.
    fn json(&self, path: &str) -> Result<Value, Failure> {
        let url = self.url(path);
        let text = self
            .agent
            .get(&url)
            .call()
            .and_then(|mut response| response.body_mut().read_to_string())
            .map_err(|error| Failure::Other(format!("GET {url}: {error}")))?;
        serde_json::from_str(&text).map_err(|error| {
            Failure::Codegen(exchange_codegen::Error::malformed_json(&url, &error))
        })
    }
}

/// Downloads the references of the deployment at `root_url` into `out` and
/// returns the files that were created or changed.
pub fn fetch_references(root_url: &str, out: &Path) -> Result<Vec<(PathBuf, Change)>, Failure> {
    let fetcher = Fetcher::new(root_url);
    let manifest_path = "/references/manifest.json";
    let manifest = fetcher.json(manifest_path)?;
    let listed = manifest
        .get("references")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            Failure::Other(format!(
                "{}#/references: expected an array of reference paths",
                fetcher.url(manifest_path)
            ))
        })?;

    // Relative output path → document.
    let mut files: BTreeMap<String, Value> = BTreeMap::new();
    let mut pending: VecDeque<(String, String)> = VecDeque::new();
    for (index, path) in listed.iter().enumerate() {
        let Some(path) = path.as_str() else {
            return Err(Failure::Other(format!(
                "{}#/references/{index}: expected a string",
                fetcher.url(manifest_path)
            )));
        };
        if !path.ends_with("/exchanges.json") {
            continue; // API and log references describe no exchanges
        }
        let Some(relative) = path
            .strip_prefix("/references/")
            .filter(|relative| stays_below(relative))
        else {
            return Err(Failure::Other(format!(
                "{}#/references/{index}: {path:?} is not below /references/",
                fetcher.url(manifest_path)
            )));
        };
        let value = fetcher.json(path)?;
        let reference =
            parse_reference(&fetcher.url(path), format!("references/{relative}"), &value)?;
        for entry in &reference.entries {
            let schema_path = entry.schema.split('#').next().unwrap_or_default();
            let uri = join_uri(
                &format!("/schemas/{}/", reference.service_name),
                schema_path,
            )
            .map_err(|reason| {
                Failure::Other(format!(
                    "{}#{}/schema: {reason}",
                    fetcher.url(path),
                    entry.pointer
                ))
            })?;
            pending.push_back((
                uri,
                format!("{}#{}/schema", fetcher.url(path), entry.pointer),
            ));
        }
        files.insert(relative.to_owned(), value);
    }

    let mut fetched = BTreeSet::new();
    while let Some((uri, referrer)) = pending.pop_front() {
        if !fetched.insert(uri.clone()) {
            continue;
        }
        let Some(relative) = uri
            .strip_prefix("/schemas/")
            .filter(|relative| stays_below(relative))
        else {
            return Err(Failure::Other(format!(
                "{referrer}: schema {uri} is not below /schemas/"
            )));
        };
        let value = fetcher
            .json(&uri)
            .map_err(|failure| Failure::Other(format!("{failure} (needed by {referrer})")))?;
        // `$ref`s resolve against the document's `$id` where it has one.
        let base = match value.get("$id").and_then(Value::as_str) {
            Some(id) => normalize_id(id).map_err(|reason| {
                Failure::Other(format!("{}#/$id: {reason}", fetcher.url(&uri)))
            })?,
            None => uri.clone(),
        };
        for (pointer, reference) in schema_refs(&value) {
            let path = reference.split('#').next().unwrap_or_default();
            if path.is_empty() {
                continue; // within the same document
            }
            let target = join_uri(&base, path).map_err(|reason| {
                Failure::Other(format!("{}#{pointer}: {reason}", fetcher.url(&uri)))
            })?;
            pending.push_back((target, format!("{}#{pointer}", fetcher.url(&uri))));
        }
        if files.insert(relative.to_owned(), value).is_some() {
            return Err(Failure::Other(format!(
                "{}: schema path {relative} clashes with a reference",
                fetcher.url(&uri)
            )));
        }
    }

    let mut changes = Vec::new();
    for (relative, value) in &files {
        let path = out.join(relative);
        let contents = format!("{}\n", canonical_json(value));
        if let Some(change) = ensure_file_contents(&path, &contents, false)? {
            changes.push((path, change));
        }
    }
    Ok(changes)
}

/// Whether a `/`-separated path from the server names a file below the output
/// directory: no empty (absolute), `.` or `..` segments, no backslashes.
fn stays_below(relative: &str) -> bool {
    !relative.contains('\\')
        && relative
            .split('/')
            .all(|segment| !matches!(segment, "" | "." | ".."))
}

//! `cargo xtask fetch-references` against a local HTTP server (127.0.0.1,
//! spawned here) serving references from memory: by default this
//! repository's own `references/` laid out as a deployment serves them; with
//! `TC_REFERENCES_BUNDLE` set, also a whole deployment's bundle (opt-in).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use exchange_codegen::{Sources, generate};

/// The environment variable naming a reference bundle for the opt-in test.
const BUNDLE_ENV: &str = "TC_REFERENCES_BUNDLE";

fn references_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../references")
}

/// Every file below `dir`, by `/`-separated path relative to it.
fn read_tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).unwrap().to_str().unwrap();
                out.insert(
                    relative.replace('\\', "/"),
                    fs::read_to_string(&path).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// This repository's `references/` as a deployment serves it (by URL path,
/// `/references/queue/v1/exchanges.json`, `/schemas/queue/v1/task-status.json`),
/// with a manifest that also lists an API reference, and a schema no exchange
/// needs.
fn repository_files() -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut listed = vec!["/references/queue/v1/api.json".to_owned()];
    for (relative, text) in read_tree(&references_dir()) {
        if relative.ends_with("/exchanges.json") {
            listed.push(format!("/references/{relative}"));
            files.insert(format!("/references/{relative}"), text);
        } else {
            files.insert(format!("/schemas/{relative}"), text);
        }
    }
    files.insert(
        "/references/queue/v1/api.json".to_owned(),
        r#"{"$schema": "/schemas/common/api-reference-v0.json#", "entries": []}"#.to_owned(),
    );
    files.insert(
        "/schemas/queue/v1/create-task-request.json".to_owned(),
        r#"{"$schema": "http://json-schema.org/draft-06/schema#", "type": "object"}"#.to_owned(),
    );
    files.insert(
        "/references/manifest.json".to_owned(),
        serde_json::json!({ "references": listed }).to_string(),
    );
    files
}

/// The files of the bundle named by `TC_REFERENCES_BUNDLE`, by URL path;
/// `None` (printing why `test` is skipped) when the variable is unset.
fn bundle_files(test: &str) -> Option<(PathBuf, BTreeMap<String, String>)> {
    let Some(bundle) = std::env::var_os(BUNDLE_ENV).map(PathBuf::from) else {
        // Past the harness's capture, so the reason shows.
        let _ = writeln!(
            std::io::stderr(),
            "skipped {test}: set {BUNDLE_ENV} to a reference bundle (see README)"
        );
        return None;
    };
    let text = fs::read_to_string(&bundle)
        .unwrap_or_else(|e| panic!("{BUNDLE_ENV}={}: {e}", bundle.display()));
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    let files = parsed
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            let content = match &item["content"] {
                serde_json::Value::String(text) => text.clone(),
                json => json.to_string(),
            };
            (format!("/{}", item["filename"].as_str().unwrap()), content)
        })
        .collect();
    Some((bundle, files))
}

/// Serves `files` over HTTP/1.0-style connections (one request each) on
/// 127.0.0.1; stops after `max_requests` or 60 seconds. Returns the root URL.
fn serve(files: BTreeMap<String, String>, max_requests: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let files = Arc::new(files);
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut served = 0;
        while served < max_requests && Instant::now() < deadline {
            let Ok((stream, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(5));
                continue;
            };
            served += 1;
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            loop {
                let mut header = String::new();
                match reader.read_line(&mut header) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if header == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_owned();
            let (status, body) = match files.get(&path) {
                Some(body) => ("200 OK", body.clone()),
                None => ("404 Not Found", format!("no {path}")),
            };
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{address}")
}

fn fetch(root_url: &str, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "fetch-references",
            "--root-url",
            root_url,
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .expect("xtask runs")
}

/// Runs the command, which must succeed.
fn fetch_successfully(root_url: &str, out: &Path) {
    let output = fetch(root_url, out);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn fetches_exchange_references_and_their_schemas() {
    let root_url = serve(repository_files(), 500);
    let temp = tempfile::tempdir().unwrap();
    let out = temp.path().join("references");
    fetch_successfully(&root_url, &out);

    // Exactly the repository's references: every exchange reference, every
    // message schema and, transitively, every schema their `$ref`s lead to
    // (task-status.json refers to task-run.json); no API reference, no
    // unreferenced schema; written as the repository has them.
    assert_eq!(read_tree(&out), read_tree(&references_dir()));
    assert!(out.join("queue/v1/task-run.json").exists());
    assert!(!out.join("queue/v1/api.json").exists());
    assert!(!out.join("queue/v1/create-task-request.json").exists());

    // Fetching again changes nothing.
    let again = fetch(&root_url, &out);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("0 files changed"));
}

/// A whole deployment's references (opt-in, `TC_REFERENCES_BUNDLE`): the
/// fetched directory generates exactly what the bundle generates.
#[test]
fn fetches_a_bundles_references() {
    let Some((bundle, files)) = bundle_files("fetches_a_bundles_references") else {
        return;
    };
    let services: Vec<String> = files
        .keys()
        .filter_map(|path| {
            let rest = path.strip_prefix("/references/")?;
            rest.ends_with("/exchanges.json")
                .then(|| rest.split('/').next().unwrap_or_default().to_owned())
        })
        .collect();
    let root_url = serve(files, 1000);
    let temp = tempfile::tempdir().unwrap();
    let out = temp.path().join("references");
    fetch_successfully(&root_url, &out);
    for service in &services {
        assert!(
            out.join(service).join("v1/exchanges.json").exists(),
            "{service}"
        );
    }
    let from_bundle = generate(&Sources::read_bundle(&bundle).unwrap()).unwrap();
    let from_fetched = generate(&Sources::read_directory(&out).unwrap()).unwrap();
    assert_eq!(from_fetched, from_bundle);
}

#[test]
fn missing_schema_fails_naming_it_and_writes_nothing() {
    let mut files = repository_files();
    files.remove("/schemas/queue/v1/task-run.json");
    let root_url = serve(files, 500);
    let temp = tempfile::tempdir().unwrap();
    let out = temp.path().join("references");
    let output = fetch(&root_url, &out);
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains(&format!("GET {root_url}/schemas/queue/v1/task-run.json")),
        "{message}"
    );
    // Names the `$ref` that needed it (the first one met, breadth first).
    assert!(
        message.contains("(needed by http://") && message.contains("/$ref)"),
        "{message}"
    );
    assert!(!out.exists(), "nothing may be written on error");
}

#[test]
fn invalid_reference_is_reported_with_its_url_and_pointer() {
    let mut files = repository_files();
    let path = "/references/queue/v1/exchanges.json";
    let mut reference: serde_json::Value = serde_json::from_str(&files[path]).unwrap();
    reference["entries"][1]
        .as_object_mut()
        .unwrap()
        .remove("routingKey");
    files.insert(path.to_owned(), reference.to_string());
    let root_url = serve(files, 500);
    let temp = tempfile::tempdir().unwrap();
    let output = fetch(&root_url, &temp.path().join("references"));
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains(&format!(
            "{root_url}{path}#/entries/1: missing \"routingKey\""
        )),
        "{message}"
    );
}

/// Paths in the server's manifest cannot make the command write outside `--out`.
#[test]
fn reference_path_leaving_the_output_directory_is_refused() {
    let mut files = repository_files();
    let escaping = "/references/../escaped/v1/exchanges.json";
    let queue = files["/references/queue/v1/exchanges.json"].clone();
    // Served as written and as an HTTP client may normalize it.
    files.insert(escaping.to_owned(), queue.clone());
    files.insert("/escaped/v1/exchanges.json".to_owned(), queue);
    files.insert(
        "/references/manifest.json".to_owned(),
        serde_json::json!({"references": ["/references/queue/v1/exchanges.json", escaping]})
            .to_string(),
    );
    let root_url = serve(files, 500);
    let temp = tempfile::tempdir().unwrap();
    let out = temp.path().join("references");
    let output = fetch(&root_url, &out);
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains(&format!(
            "{root_url}/references/manifest.json#/references/1: \"{escaping}\" is not below /references/"
        )),
        "{message}"
    );
    assert!(!out.exists(), "nothing may be written on error");
    assert!(!temp.path().join("escaped").exists());
}

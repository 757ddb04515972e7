//! `cargo xtask fetch-references` against a local HTTP server (127.0.0.1,
//! spawned here) serving the v19 bundle's files from memory.

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

fn v19_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/corpus/taskcluster-v19/references.json")
}

/// The bundle's files by URL path (`/references/queue/v1/exchanges.json`).
fn bundle_files() -> BTreeMap<String, String> {
    let bundle: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(v19_bundle()).unwrap()).unwrap();
    bundle
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
        .collect()
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

#[test]
fn fetches_exchange_references_and_their_schemas() {
    let root_url = serve(bundle_files(), 500);
    let temp = tempfile::tempdir().unwrap();
    let out = temp.path().join("references");
    let output = fetch(&root_url, &out);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    for service in [
        "auth",
        "github",
        "hooks",
        "notify",
        "queue",
        "worker-manager",
    ] {
        assert!(
            out.join(service).join("v1/exchanges.json").exists(),
            "{service}"
        );
    }
    // Only exchange references: no API or log references, no services without exchanges.
    assert!(!out.join("queue/v1/api.json").exists());
    assert!(!out.join("queue/v1/logs.json").exists());
    assert!(!out.join("secrets").exists());
    // Message schemas, and the schemas their `$ref`s lead to (transitively).
    assert!(out.join("queue/v1/task-completed-message.json").exists());
    assert!(out.join("queue/v1/task-status.json").exists());
    assert!(
        out.join("queue/v1/task.json").exists(),
        "task-status.json refers to task.json"
    );
    assert!(
        out.join("queue/v1/task-metadata.json").exists(),
        "task.json refers to task-metadata.json"
    );
    assert!(out.join("worker-manager/v1/worker-pool-full.json").exists());
    assert!(
        !out.join("queue/v1/create-task-request.json").exists(),
        "unreferenced schemas are not fetched"
    );

    // The fetched directory generates exactly what the bundle generates.
    let from_bundle = generate(&Sources::read_bundle(&v19_bundle()).unwrap()).unwrap();
    let from_fetched = generate(&Sources::read_directory(&out).unwrap()).unwrap();
    assert_eq!(from_fetched, from_bundle);

    // Fetching again changes nothing.
    let again = fetch(&root_url, &out);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("0 files changed"));
}

#[test]
fn missing_schema_fails_naming_it_and_writes_nothing() {
    let mut files = bundle_files();
    files.remove("/schemas/queue/v1/task.json");
    let root_url = serve(files, 500);
    let temp = tempfile::tempdir().unwrap();
    let out = temp.path().join("references");
    let output = fetch(&root_url, &out);
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains(&format!("GET {root_url}/schemas/queue/v1/task.json")),
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
    let mut files = bundle_files();
    let path = "/references/notify/v1/exchanges.json";
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
    let mut files = bundle_files();
    let escaping = "/references/../escaped/v1/exchanges.json";
    let notify = files["/references/notify/v1/exchanges.json"].clone();
    // Served as written and as an HTTP client may normalize it.
    files.insert(escaping.to_owned(), notify.clone());
    files.insert("/escaped/v1/exchanges.json".to_owned(), notify);
    files.insert(
        "/references/manifest.json".to_owned(),
        serde_json::json!({"references": ["/references/notify/v1/exchanges.json", escaping]})
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

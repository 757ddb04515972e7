//! `cargo xtask <command>`: see `cargo xtask --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xtask::{check_bundle, display_path, fetch, regenerate, workspace_root};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Regenerate the `taskcluster-exchanges` crate from exchange references.
    Regenerate {
        /// References directory, or a bundle file (JSON array of {filename, content}).
        #[arg(long, value_name = "PATH")]
        references: Option<PathBuf>,
        /// Directory of the generated crate.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Write nothing; fail listing every stale, missing or orphaned file.
        #[arg(long)]
        check: bool,
    },
    /// Generate a reference bundle into a scratch crate and lint it (`cargo clippy -D warnings`).
    CheckBundle {
        /// The bundle (default: $TC_REFERENCES_BUNDLE, else ../shared/corpus/taskcluster-v19/references.json).
        bundle: Option<PathBuf>,
        /// Scratch directory (default: <target dir>/check-bundle).
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
    },
    /// Download a deployment's exchange references and the schemas they need.
    FetchReferences {
        /// The deployment's root URL (`http://…`; HTTPS needs `--features tls`).
        #[arg(long, value_name = "URL")]
        root_url: String,
        /// Directory to write the references into.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Regenerate {
            references,
            out,
            check,
        } => {
            let mut fix = String::from("cargo xtask regenerate");
            if let Some(path) = &references {
                fix.push_str(&format!(" --references {}", path.display()));
            }
            if let Some(path) = &out {
                fix.push_str(&format!(" --out {}", path.display()));
            }
            let references = references.unwrap_or_else(|| workspace_root().join("references"));
            let out = out.unwrap_or_else(|| workspace_root().join("generated"));
            regenerate::regenerate(&references, &out, check, &fix).map(|report| {
                if check {
                    eprintln!("{} is up to date", display_path(&out));
                } else if report.changes.is_empty() {
                    eprintln!("{} was already up to date", display_path(&out));
                } else {
                    for (path, change) in &report.changes {
                        let what = match change {
                            regenerate::Change::Missing => "created",
                            regenerate::Change::Stale => "updated",
                            regenerate::Change::Orphaned => "removed",
                        };
                        eprintln!("{what} {}", display_path(path));
                    }
                }
            })
        }
        Command::CheckBundle { bundle, scratch } => {
            let bundle = bundle.unwrap_or_else(check_bundle::default_bundle);
            let scratch = scratch.unwrap_or_else(check_bundle::default_scratch);
            check_bundle::check_bundle(&bundle, &scratch).map(|()| {
                eprintln!(
                    "{} generates a crate that passes clippy",
                    display_path(&bundle)
                )
            })
        }
        Command::FetchReferences { root_url, out } => {
            let out = out.unwrap_or_else(|| workspace_root().join("references"));
            fetch::fetch_references(&root_url, &out).map(|changes| {
                for (path, change) in &changes {
                    let what = match change {
                        regenerate::Change::Missing => "created",
                        _ => "updated",
                    };
                    eprintln!("{what} {}", display_path(path));
                }
                eprintln!("{} files changed in {}", changes.len(), display_path(&out));
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::FAILURE
        }
    }
}

//! The generator on the whole v19 reference bundle
//! (`../shared/corpus/taskcluster-v19/references.json`): parsing the bundle,
//! the load+model stages, and the full generation to formatted source.
//!
//! Run with `cargo bench -p exchange-codegen --bench generate`.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use exchange_codegen::{Sources, generate, load, model};

fn bundle_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/corpus/taskcluster-v19/references.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn bench_generator(c: &mut Criterion) {
    let text = bundle_text();
    let sources = Sources::from_bundle_text("references.json", &text).expect("bundle parses");

    c.bench_function("v19/parse_bundle", |b| {
        b.iter(|| Sources::from_bundle_text("references.json", black_box(&text)).unwrap())
    });
    c.bench_function("v19/load_and_model", |b| {
        b.iter(|| {
            let loaded = load::load(black_box(&sources)).unwrap();
            model::build(&loaded).unwrap()
        })
    });
    c.bench_function("v19/generate", |b| {
        b.iter(|| generate(black_box(&sources)).unwrap())
    });
}

criterion_group!(benches, bench_generator);
criterion_main!(benches);

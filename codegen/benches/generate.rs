//! The generator on a whole reference bundle (`TC_REFERENCES_BUNDLE`, e.g.
//! the Taskcluster v19 one): parsing the bundle,
//! the load+model stages, and the full generation to formatted source.
//!
//! Run with `TC_REFERENCES_BUNDLE=PATH cargo bench -p exchange-codegen --bench generate`.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use exchange_codegen::{Sources, generate, load, model};

fn bundle_text() -> String {
    let Some(path) = std::env::var_os("TC_REFERENCES_BUNDLE").map(PathBuf::from) else {
        panic!("set TC_REFERENCES_BUNDLE to a reference bundle (see README)");
    };
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

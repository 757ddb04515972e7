//! Generates Rust bindings from exchange references (placeholder, being written).

//! Typed bindings for Taskcluster exchanges (placeholder until generated).

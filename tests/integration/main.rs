//! kiln's integration tests: one binary, one module per area.

mod support;

mod agent;
mod bad_input;
mod cli;
mod examples;
mod fixtures;

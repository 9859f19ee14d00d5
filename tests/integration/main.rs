//! kiln's integration tests: one binary, one module per area.

mod support;

mod agent;
mod aws;
mod bad_input;
mod cli;
mod cold_start;
mod control;
mod delivery;
mod differential;
mod egress;
mod embedded;
mod engine;
mod escape;
mod examples;
mod fixtures;
mod host_io;
mod infra;
mod lambda;
mod pipeline_asl;
mod presigned;
mod refusals;
mod rehearsal;
mod service_roles;
mod signatures;
mod simulate;
mod stack_grants;
mod stages;
mod tools;

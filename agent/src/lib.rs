//! kiln-agent: an open, AWSTOE-compatible component runner. It runs on EC2 builders (fetched by
//! the customize command) and inside embedded sandboxes, and shares the document model with kiln.

pub mod actions;
pub mod cgroup;
pub mod clean;
pub mod cli;
pub mod eval;
pub mod exec;
pub mod http;
pub mod posture;
pub mod report;
pub mod runner;
pub mod s3;
pub mod sandbox;
pub mod secrets;
pub mod usernet;

//! The pipeline file and the values derived from it: versions, ids, schedules, fingerprints.

pub mod build;
pub mod cron;
pub mod fingerprint;
pub mod ids;
pub mod load;
pub mod pipeline;
pub mod version;

pub use load::{load, load_str};
pub use pipeline::{LoadedComponent, LoadedPipeline, Pipeline};

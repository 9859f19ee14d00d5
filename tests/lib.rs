//! kiln-tests holds the integration tests (`integration/`) and the benchmarks that need the
//! built binaries (`benches/`); this library has what both use.

pub mod runtime_api;

//! kiln-tests holds the integration tests; see `integration/`.

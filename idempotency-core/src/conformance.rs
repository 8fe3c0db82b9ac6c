//! The store conformance suite (filled in by the stores issue).

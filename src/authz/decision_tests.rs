//! Unit tests of the decision (every branch of SPEC §2).

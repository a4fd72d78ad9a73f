//! Unit tests of the builders.

//! Volume store.

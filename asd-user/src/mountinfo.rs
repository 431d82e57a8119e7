//! The mount table: the `mountfd` crate's reader, under the name the manager's modules use.

pub use mountfd::mountinfo::*;

//! Wire protocol between the asd manager and the root helper (see DESIGN.md §6).

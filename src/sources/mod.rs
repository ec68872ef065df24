//! Sources yield deliveries in order. Every source produces the same Event (DESIGN.md §2).

pub mod jsonl;
pub mod pubsub;

use crate::event::Event;

/// One item from a source.
#[derive(Debug)]
pub enum Delivery {
    /// A decoded event; `position` says where it came from (e.g. `events.jsonl:12`).
    Event { event: Box<Event>, position: String },
    /// Input that is not an event: it is counted, logged and dead-lettered, and the stream goes on.
    Malformed {
        position: String,
        raw: String,
        error: String,
    },
}

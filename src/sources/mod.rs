//! Sources yield deliveries in order. Every source produces the same Event (DESIGN.md §2).

pub mod jsonl;
pub mod pubsub;

use crate::event::Event;

/// One item from a source.
#[derive(Debug)]
pub enum Delivery {
    /// A decoded event; `position` says where it came from (e.g. `events.jsonl:12`), `end` is the source
    /// position just past it (stored once it is settled).
    Event {
        event: Box<Event>,
        position: String,
        end: Vec<u8>,
    },
    /// Input that is not an event: it is counted, logged and dead-lettered, and the stream goes on.
    Malformed {
        position: String,
        raw: String,
        error: String,
        end: Vec<u8>,
    },
}

impl Delivery {
    /// The source position just past this delivery.
    pub fn end(&self) -> &[u8] {
        match self {
            Delivery::Event { end, .. } | Delivery::Malformed { end, .. } => end,
        }
    }
}

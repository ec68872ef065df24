//! Sources yield deliveries in order. Every source produces the same Event (DESIGN.md §2).

pub mod jsonl;
pub mod pubsub;

use std::sync::Arc;

use crate::event::Event;
use jsonl::JsonlSource;
use pubsub::subscriber::PubsubSource;

/// A delivery and the checkpoint key its position belongs to (`None`: not stored, e.g. stdin).
#[derive(Debug)]
pub struct Sourced {
    pub key: Option<Arc<str>>,
    /// The channel lease the delivery came under (replicas); its token fences the position and done markers.
    pub fence: Option<Arc<crate::state::Fence>>,
    pub delivery: Delivery,
}

/// Every source the pipeline can read.
pub enum Source {
    Jsonl(JsonlSource),
    Pubsub(PubsubSource),
}

impl Source {
    /// The next delivery; `None` when the source has ended (a finite file, or a stopped subscription).
    pub async fn next(&mut self) -> Option<Sourced> {
        match self {
            Source::Jsonl(source) => {
                let delivery = source.next().await?;
                Some(Sourced {
                    key: source.key.as_deref().map(Arc::from),
                    fence: None,
                    delivery,
                })
            }
            Source::Pubsub(source) => source.next().await,
        }
    }
}

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
        /// The event's id and channel, when the input names them (a Pub/Sub event always does; a JSONL line
        /// that parses as JSON may): the journal files the rejection under them.
        event_id: Option<String>,
        channel: Option<String>,
        end: Vec<u8>,
    },
    /// The source moved without an event (a keepalive's latest replay id): stored once every earlier delivery
    /// has settled, so a quiet channel's position stays fresh.
    Mark { end: Vec<u8> },
}

impl Delivery {
    /// The source position just past this delivery.
    pub fn end(&self) -> &[u8] {
        match self {
            Delivery::Event { end, .. } | Delivery::Malformed { end, .. } | Delivery::Mark { end } => end,
        }
    }
}

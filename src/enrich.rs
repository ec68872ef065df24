//! The Enricher: reads the records routes asked for, only for routes whose `when` passed.

use crate::config::EnricherKind;
use crate::event::Event;
use crate::router::{EnrichRequest, Records};

/// Where records come from. `Recorded` replays the event's own `record` map, which keeps `run` on
/// recorded events, `explain` and rule tests deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enricher {
    /// No enrichment: rules that declare `enrich` are refused at load time.
    None,
    /// The `record` map recorded with the event.
    Recorded,
}

impl Enricher {
    pub fn from_kind(kind: EnricherKind) -> Self {
        match kind {
            EnricherKind::None => Enricher::None,
            EnricherKind::Recorded => Enricher::Recorded,
        }
    }

    /// Reads every requested record. A failure is per record: its routes fail (dead letter), the
    /// others go on.
    pub async fn read(&self, event: &Event, requests: &[EnrichRequest]) -> Records {
        requests
            .iter()
            .map(|r| {
                let result = match self {
                    Enricher::None => Err("the `none` enricher reads no records".to_string()),
                    Enricher::Recorded => match event.record.get(&r.record_id) {
                        Some(fields) => Ok(fields.clone()),
                        None => Err(format!(
                            "the event has no recorded `record` entry for {} `{}` (record `null` means not found)",
                            r.object, r.record_id
                        )),
                    },
                };
                (r.record_id.clone(), result)
            })
            .collect()
    }
}

//! The Enricher: reads the records routes asked for, only for routes whose `when` passed, once per record per
//! event (the router merges the fields routes ask for).

mod salesforce;

use std::sync::Arc;

pub use salesforce::SalesforceEnricher;

use crate::event::Event;
use crate::obs::metrics as m;
use crate::router::{EnrichRequest, Records};

/// Where records come from. `Recorded` replays the event's own `record` map, which keeps `run` on
/// recorded events, `explain` and rule tests deterministic; `Salesforce` reads the current record over REST.
#[derive(Clone)]
pub enum Enricher {
    /// No enrichment: rules that declare `enrich` are refused at load time.
    None,
    /// The `record` map recorded with the event.
    Recorded,
    /// `GET /services/data/vXX.X/sobjects/{object}/{id}?fields=...`.
    Salesforce(Arc<SalesforceEnricher>),
}

impl std::fmt::Debug for Enricher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Enricher::None => "none",
            Enricher::Recorded => "recorded",
            Enricher::Salesforce(_) => "salesforce",
        })
    }
}

impl Enricher {
    /// Reads every requested record. A failure is per record: its routes fail (dead letter), the
    /// others go on.
    pub async fn read(&self, event: &Event, requests: &[EnrichRequest]) -> Records {
        if let Enricher::Salesforce(rest) = self {
            metrics::histogram!(m::ENRICH_CALLS_PER_EVENT).record(requests.len() as f64);
            let reads = requests.iter().map(|r| async move {
                let result = rest.read(r).await.map_err(|e| {
                    tracing::warn!(event_id = %event.id, record_id = %r.record_id, object = %r.object, error = %e, "Enrichment failed.");
                    e.to_string()
                });
                (r.record_id.clone(), result)
            });
            return futures_util::future::join_all(reads).await.into_iter().collect();
        }
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
                    Enricher::Salesforce(_) => unreachable!("handled above"),
                };
                (r.record_id.clone(), result)
            })
            .collect()
    }
}

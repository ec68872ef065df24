//! `switchyard record --out F`: subscribes like `run`, but writes the decoded events as JSONL (DESIGN.md §2),
//! each with the records the rules read for it, instead of running actions. Real traffic becomes test fixtures
//! and input for the JSONL source, `explain` and `replay`; nothing is enqueued and no position is stored.

use std::io::Write;
use std::path::Path;

use tokio::sync::watch;

use crate::app::service::Service;
use crate::router;
use crate::sources::{Delivery, Source};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("`record` needs a Pub/Sub source (`source.kind: pubsub` or `emulator`)")]
    NotPubsub,
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error(transparent)]
    Start(#[from] crate::app::service::StartError),
}

/// What a recording wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub events: u64,
    pub malformed: u64,
}

/// Records until `max_events` events were written or `shutdown` flips. `redact` replaces payload and record fields
/// with `***` (personal data in fixtures).
pub async fn record(
    service: &Service,
    out: &Path,
    redact: &[String],
    max_events: Option<u64>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Recorded, RecordError> {
    let Source::Pubsub(mut source) = service.source().await? else {
        return Err(RecordError::NotPubsub);
    };
    let failed = |source| RecordError::Write {
        path: out.display().to_string(),
        source,
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(out).map_err(failed)?);
    let mut done = Recorded::default();
    loop {
        if max_events.is_some_and(|max| done.events >= max) {
            break;
        }
        let sourced = tokio::select! {
            sourced = source.next() => sourced,
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let Some(sourced) = sourced else { break };
        match sourced.delivery {
            Delivery::Event {
                mut event, position, ..
            } => {
                // The records the rules would read, read now, so a replay of the file decides the same.
                let rules = service.rules.load_full();
                let requests = router::needs(&rules, &event).requests(&rules);
                if !requests.is_empty() {
                    for (id, result) in service.pipeline.enricher.read(&event, &requests).await {
                        match result {
                            Ok(fields) => {
                                event.record.insert(id, fields);
                            }
                            Err(e) => {
                                tracing::warn!(event_id = %event.id, record_id = %id, error = %e, "Cannot read the record; the event is written without it.")
                            }
                        }
                    }
                }
                event.redact(redact);
                let line = serde_json::to_string(&event).expect("an Event always serializes");
                writeln!(file, "{line}").map_err(failed)?;
                file.flush().map_err(failed)?;
                done.events += 1;
                tracing::debug!(event_id = %event.id, %position, "Recorded.");
            }
            Delivery::Malformed { position, error, .. } => {
                done.malformed += 1;
                tracing::warn!(%position, %error, "An event that cannot be decoded is not recorded.");
            }
            Delivery::Mark { .. } => {}
        }
    }
    file.flush().map_err(failed)?;
    source.stopper().send_replace(true);
    Ok(done)
}

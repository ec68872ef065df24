//! The JSONL source: a file (optionally followed as it grows), standard input, or embedded text.
//! Its position is the byte offset just past a line; a file source resumes from a stored offset.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use super::Delivery;
use crate::event::Event;
use crate::state::offset_bytes;

/// How often a followed file is polled for new lines once its end is reached.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Lines longer than this are refused as malformed instead of being held in memory.
const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

pub struct JsonlSource {
    name: String,
    /// The checkpoint key of this source (`jsonl:<absolute path>`; `None` for stdin and embedded text).
    pub key: Option<String>,
    reader: Box<dyn AsyncBufRead + Unpin + Send>,
    follow: bool,
    line: u64,
    /// Bytes consumed so far.
    offset: u64,
    pending: String,
}

impl JsonlSource {
    /// Opens `path`, resuming at byte `start` (a stored position; 0 for the beginning).
    pub async fn file(path: &Path, follow: bool, start: u64) -> std::io::Result<JsonlSource> {
        use tokio::io::AsyncSeekExt;
        let mut file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        // A stored offset past the end means the file was replaced (rotated or rewritten): start over.
        let start = if start <= len { start } else { 0 };
        file.seek(std::io::SeekFrom::Start(start)).await?;
        let mut source = Self::new(path.display().to_string(), Box::new(BufReader::new(file)), follow);
        source.offset = start;
        source.key = Some(Self::key_for(path));
        Ok(source)
    }

    /// The checkpoint key of a JSONL file: its absolute path.
    pub fn key_for(path: &Path) -> String {
        let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        format!("jsonl:{}", absolute.display())
    }

    pub fn stdin() -> JsonlSource {
        Self::new("<stdin>".into(), Box::new(BufReader::new(tokio::io::stdin())), false)
    }

    pub fn text(name: &str, text: &'static str) -> JsonlSource {
        Self::new(name.into(), Box::new(BufReader::new(text.as_bytes())), false)
    }

    fn new(name: String, reader: Box<dyn AsyncBufRead + Unpin + Send>, follow: bool) -> Self {
        JsonlSource {
            name,
            key: None,
            reader,
            follow,
            line: 0,
            offset: 0,
            pending: String::new(),
        }
    }

    /// The next delivery; `None` at the end of the input (never, when following).
    ///
    /// Cancel-safe at line granularity: a partial line stays in `pending` until its newline arrives.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            let mut chunk = String::new();
            let read = match self.reader.read_line(&mut chunk).await {
                Ok(n) => n,
                Err(e) => {
                    self.line += 1;
                    let position = format!("{}:{}", self.name, self.line);
                    let error = format!("unreadable line: {e}");
                    return Some(Delivery::Malformed {
                        position,
                        raw: String::new(),
                        error,
                        event_id: None,
                        channel: None,
                        end: offset_bytes(self.offset),
                    });
                }
            };
            self.pending.push_str(&chunk);
            let complete = self.pending.ends_with('\n');
            if read == 0 || !complete {
                if self.follow {
                    if self.pending.len() > MAX_LINE_BYTES {
                        let raw = std::mem::take(&mut self.pending);
                        return Some(self.deliver(raw));
                    }
                    tokio::time::sleep(FOLLOW_POLL).await;
                    continue;
                }
                if self.pending.is_empty() {
                    return None;
                }
            }
            let raw = std::mem::take(&mut self.pending);
            if raw.trim().is_empty() {
                self.line += 1;
                self.offset += raw.len() as u64;
                continue;
            }
            return Some(self.deliver(raw));
        }
    }

    fn deliver(&mut self, raw: String) -> Delivery {
        self.line += 1;
        self.offset += raw.len() as u64;
        let end = offset_bytes(self.offset);
        let position = format!("{}:{}", self.name, self.line);
        let text = raw.trim_end_matches(['\n', '\r']);
        if text.len() > MAX_LINE_BYTES {
            let error = format!("line of {} bytes is over the {MAX_LINE_BYTES}-byte limit", text.len());
            return Delivery::Malformed {
                position,
                raw: text.chars().take(1024).collect(),
                error,
                event_id: None,
                channel: None,
                end,
            };
        }
        match Event::from_json(text) {
            Ok(event) => Delivery::Event {
                event: Box::new(event),
                position,
                end,
            },
            Err(e) => {
                // A line that is JSON but not an event may still say which event it meant to be.
                let named = serde_json::from_str::<serde_json::Value>(text).ok();
                let name = |key: &str| {
                    named
                        .as_ref()
                        .and_then(|v| v.get(key))
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_string)
                };
                Delivery::Malformed {
                    position,
                    raw: text.to_string(),
                    error: e.to_string(),
                    event_id: name("id"),
                    channel: name("channel"),
                    end,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::offset_of;

    const TEXT: &str =
        "{\"id\":\"a\",\"channel\":\"/event/X__e\"}\n\nnot json\n{\"id\":\"b\",\"channel\":\"/event/X__e\"}";

    #[tokio::test]
    async fn malformed_lines_are_reported_with_their_line_and_the_rest_goes_on() {
        let mut source = JsonlSource::text("events.jsonl", TEXT);
        assert!(matches!(source.next().await, Some(Delivery::Event { event, .. }) if event.id == "a"));
        match source.next().await {
            Some(Delivery::Malformed { position, end, .. }) => {
                assert_eq!(position, "events.jsonl:3");
                assert_eq!(offset_of(&end), Some(45));
            }
            other => panic!("expected a malformed line, got {other:?}"),
        }
        let last = source.next().await;
        assert!(
            matches!(&last, Some(Delivery::Event { event, position, .. }) if event.id == "b" && position == "events.jsonl:4"),
            "{last:?}"
        );
        assert!(source.next().await.is_none());
    }

    #[tokio::test]
    async fn a_file_resumes_at_a_stored_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.jsonl");
        std::fs::write(&path, TEXT).unwrap();
        let mut source = JsonlSource::file(&path, false, 45).await.unwrap();
        assert!(matches!(source.next().await, Some(Delivery::Event { event, .. }) if event.id == "b"));
        assert!(source.next().await.is_none());
        // An offset past the end (the file was replaced) starts over.
        let mut source = JsonlSource::file(&path, false, 10_000).await.unwrap();
        assert!(matches!(source.next().await, Some(Delivery::Event { event, .. }) if event.id == "a"));
    }
}

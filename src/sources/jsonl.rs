//! The JSONL source: a file (optionally followed as it grows), standard input, or embedded text.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use super::Delivery;
use crate::event::Event;

/// How often a followed file is polled for new lines once its end is reached.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Lines longer than this are refused as malformed instead of being held in memory.
const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

pub struct JsonlSource {
    name: String,
    reader: Box<dyn AsyncBufRead + Unpin + Send>,
    follow: bool,
    line: u64,
    pending: String,
}

impl JsonlSource {
    pub async fn file(path: &Path, follow: bool) -> std::io::Result<JsonlSource> {
        let file = tokio::fs::File::open(path).await?;
        Ok(Self::new(
            path.display().to_string(),
            Box::new(BufReader::new(file)),
            follow,
        ))
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
            reader,
            follow,
            line: 0,
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
                    return Some(Delivery::Malformed {
                        position,
                        raw: String::new(),
                        error: format!("unreadable line: {e}"),
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
                continue;
            }
            return Some(self.deliver(raw));
        }
    }

    fn deliver(&mut self, raw: String) -> Delivery {
        self.line += 1;
        let position = format!("{}:{}", self.name, self.line);
        let text = raw.trim_end_matches(['\n', '\r']);
        if text.len() > MAX_LINE_BYTES {
            let error = format!("line of {} bytes is over the {MAX_LINE_BYTES}-byte limit", text.len());
            return Delivery::Malformed {
                position,
                raw: text.chars().take(1024).collect(),
                error,
            };
        }
        match Event::from_json(text) {
            Ok(event) => Delivery::Event {
                event: Box::new(event),
                position,
            },
            Err(e) => Delivery::Malformed {
                position,
                raw: text.to_string(),
                error: e.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn malformed_lines_are_reported_with_their_line_and_the_rest_goes_on() {
        let mut source = JsonlSource::text(
            "events.jsonl",
            "{\"id\":\"a\",\"channel\":\"/event/X__e\"}\n\nnot json\n{\"id\":\"b\",\"channel\":\"/event/X__e\"}",
        );
        assert!(matches!(source.next().await, Some(Delivery::Event { event, .. }) if event.id == "a"));
        match source.next().await {
            Some(Delivery::Malformed { position, .. }) => assert_eq!(position, "events.jsonl:3"),
            other => panic!("expected a malformed line, got {other:?}"),
        }
        assert!(
            matches!(source.next().await, Some(Delivery::Event { event, position }) if event.id == "b" && position == "events.jsonl:4")
        );
        assert!(source.next().await.is_none());
    }
}

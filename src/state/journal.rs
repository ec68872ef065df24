//! The decision journal: one entry per decided event (what every route on its channel did, and what the actions
//! returned), for `switchyard why` and `switchyard tap`.
//!
//! The pipeline hands entries over without waiting ([`Journal::record`]); one writer task stores them in batches:
//! in the main Redis, one script call per batch appends to the stream `{prefix}journal` (trimmed to `max_len`,
//! `MAXLEN ~`, and to the retention, `MINID ~`) and adds `id \0 stream-id` for each of its record ids, event id
//! and idempotency keys to the index (`{prefix}journal:idx:{n}`, a sorted set per run of consecutive entries,
//! expiring a retention after its last write and deleted once the cap has trimmed its entries), so one record's
//! history is found in O(log n) per bucket. Without Redis, a bounded ring in memory. A journal that falls behind drops entries and counts them
//! (`switchyard_journal_dropped_total`): it never slows delivery.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::Conn;
use crate::event::Event;
use crate::failure::Failure;
use crate::obs::metrics as m;

/// Entries waiting for the writer; past this, new ones are dropped (and counted).
const QUEUE: usize = 16_384;
/// Entries per script call.
const BATCH: usize = 256;
/// History returned for one id, newest first.
const HISTORY: usize = 200;

/// One stream entry as Redis returns it: its id and its field/value pairs.
type StreamEntry = (String, Vec<(String, String)>);

/// One decided event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The stream id (Redis) or sequence number (memory); set when read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub at_ms: u64,
    pub event_id: String,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_user: Option<String>,
    #[serde(default)]
    pub record_ids: Vec<String>,
    /// Where the event was in its source: a replay id or a file offset.
    pub position: String,
    pub rules_version: String,
    /// Every live route of the channel, in rule order (per record for the routes whose `when` held).
    pub routes: Vec<RouteEntry>,
    /// Why no route saw the event: input that is not an event (malformed JSON, a corrupt Avro payload, an
    /// unknown schema id), dead-lettered before routing, with the dead letter's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    /// The event as decided (masked), so a reader can say which clause of a route's `when` was false (absent
    /// from the live tap, which needs only the outcomes).
    #[serde(default)]
    pub event: Event,
}

/// What one route did with the event (for one record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteEntry {
    pub route: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
    #[serde(flatten)]
    pub outcome: RouteOutcome,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ActionEntry>,
}

/// A route's outcome, as `why` and `tap` name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum RouteOutcome {
    /// `when` and `guard` held: the `then` actions ran.
    Fired,
    /// `when` held, `guard` did not: the `else` actions ran.
    GuardFailed,
    /// `when` was false.
    NotMatched,
    /// An earlier route with `stop: true` took the event.
    Skipped { by: String },
    /// The route is paused by its runaway guard: its actions were dead-lettered.
    Paused { reason: String },
    /// A predicate, the enrichment or a template failed: dead-lettered.
    Failed { reason: String },
}

impl RouteOutcome {
    /// The name `tap --outcome` filters on.
    pub fn name(&self) -> &'static str {
        match self {
            RouteOutcome::Fired => "fired",
            RouteOutcome::GuardFailed => "guard-failed",
            RouteOutcome::NotMatched => "not-matched",
            RouteOutcome::Skipped { .. } => "skipped",
            RouteOutcome::Paused { .. } => "paused",
            RouteOutcome::Failed { .. } => "failed",
        }
    }
}

/// One action and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionEntry {
    pub sink: String,
    /// What it did, in a few words (`enqueue provision-order job …`).
    pub summary: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// `done`, `done after N attempts`, `duplicate: already done`, `dead-lettered: reason`, ….
    pub result: String,
}

impl Entry {
    /// The ids the entry is found by: its record ids, its event id and its actions' idempotency keys.
    pub fn ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.record_ids.iter().map(String::as_str).collect();
        ids.push(&self.event_id);
        if self.rejected.is_some() && self.position != self.event_id {
            // Input rejected before routing is found by where it was, too (`events.jsonl:7`, a replay id).
            ids.push(&self.position);
        }
        for key in self
            .routes
            .iter()
            .flat_map(|r| &r.actions)
            .filter_map(|a| a.idempotency_key.as_deref())
        {
            if !ids.contains(&key) {
                ids.push(key);
            }
        }
        ids
    }
}

/// Where the journal lives.
pub enum Store {
    Redis {
        conn: Conn,
        prefix: String,
        max_len: usize,
        retention: Duration,
    },
    Memory {
        ring: Mutex<(u64, VecDeque<Entry>)>,
        max_len: usize,
    },
}

/// Appends a batch: `KEYS` = the stream and the entry counter; `ARGV` = max_len, the oldest time kept (ms), the
/// retention (ms), the index key prefix, the bucket size, then per entry its JSON and its ids (count first, each
/// id followed by `\0`).
///
/// The index is one sorted set per [`bucket_size`] consecutive entries (the counter numbers them), members
/// `id \0 stream-id`, all of score 0, so that `ZRANGEBYLEX` finds an id's members in O(log n). A bucket expires a
/// retention after its last write, and is deleted as soon as the stream's cap has trimmed every entry it names: the
/// index never outgrows the stream, however fast events come, and its sets stay small (an insert into a set of a
/// few thousand members costs Redis well under half of one into a set of a million, measured with `redis-server`
/// 7.0 on this project's CI machine). Keys are built in the script from the prefix; they share its hash tag
/// (validated on a Cluster), so they live in the slot of the stream.
static APPEND: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local maxlen, minms, retention, idx, size = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local n = 0
local i = 6
while i <= #ARGV do
  n = n + 1
  i = i + 2 + tonumber(ARGV[i + 1])
end
local seq = redis.call('INCRBY', KEYS[2], n) - n
local add, bucket = {}, math.floor(seq / size)
local function flush()
  if #add > 0 then
    redis.call('ZADD', idx .. bucket, unpack(add))
    redis.call('PEXPIRE', idx .. bucket, retention)
    add = {}
  end
end
i = 6
while i <= #ARGV do
  local c = tonumber(ARGV[i + 1])
  local sid = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'entry', ARGV[i])
  local b = math.floor(seq / size)
  -- unpack() is bounded by Lua's C stack (8,000 values): add in chunks, and per bucket.
  if b ~= bucket or #add >= 2000 then
    flush()
    bucket = b
  end
  for j = 1, c do
    add[#add + 1] = 0
    add[#add + 1] = ARGV[i + 1 + j] .. sid
  end
  seq = seq + 1
  i = i + 2 + c
end
flush()
-- The buckets whose every entry is past the cap (the stream keeps about maxlen): gone with them.
local stale = math.floor((seq - maxlen) / size) - 1
local first_stale = math.floor((seq - n - maxlen) / size) - 1
for s = math.max(first_stale, 0), stale do
  redis.call('UNLINK', idx .. s)
end
redis.call('XTRIM', KEYS[1], 'MINID', '~', minms)
return seq
"#,
    )
});

/// Entries per index bucket (see [`APPEND`]): a sixteenth of the cap, so that about 17 buckets cover what the
/// stream holds, and `why` reads them in one pipelined round trip.
fn bucket_size(max_len: usize) -> u64 {
    (max_len as u64 / 16).clamp(256, 65_536)
}

impl Store {
    pub fn stream_key(prefix: &str) -> String {
        format!("{prefix}journal")
    }

    /// The prefix of the index buckets' keys (the bucket number follows).
    pub fn index_prefix(prefix: &str) -> String {
        format!("{prefix}journal:idx:")
    }

    /// The counter of entries ever appended, which numbers them for the index buckets.
    pub fn counter_key(prefix: &str) -> String {
        format!("{prefix}journal:seq")
    }

    async fn append(&self, entries: &[Entry], now_ms: u64) -> Result<(), Failure> {
        match self {
            Store::Redis {
                conn,
                prefix,
                max_len,
                retention,
            } => {
                let retention_ms = retention.as_millis() as u64;
                let mut invocation = APPEND.key(Self::stream_key(prefix));
                invocation
                    .key(Self::counter_key(prefix))
                    .arg(*max_len)
                    .arg(now_ms.saturating_sub(retention_ms))
                    .arg(retention_ms)
                    .arg(Self::index_prefix(prefix))
                    .arg(bucket_size(*max_len));
                let mut member = Vec::new();
                for entry in entries {
                    let ids = entry.ids();
                    invocation
                        .arg(serde_json::to_string(entry).unwrap_or_default())
                        .arg(ids.len());
                    for id in ids {
                        member.clear();
                        member.extend_from_slice(id.as_bytes());
                        member.push(0);
                        invocation.arg(&member[..]);
                    }
                }
                let mut conn = conn.clone();
                invocation
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(())
            }
            Store::Memory { ring, max_len } => {
                let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
                for entry in entries {
                    ring.0 += 1;
                    let mut entry = entry.clone();
                    entry.id = Some(ring.0.to_string());
                    ring.1.push_back(entry);
                    while ring.1.len() > *max_len {
                        ring.1.pop_front();
                    }
                }
                Ok(())
            }
        }
    }

    /// The entries found by `id` (record id, event id or idempotency key), newest first, and how many the index
    /// still names but the stream no longer holds (trimmed to `max_len`).
    pub async fn history(&self, id: &str) -> Result<(Vec<Entry>, usize), Failure> {
        match self {
            Store::Redis {
                conn,
                prefix,
                retention,
                max_len,
            } => {
                let mut conn = conn.clone();
                // Every bucket that can still name an entry of the stream, newest first; members older than the
                // retention are skipped (a bucket expires a retention after its newest entry, not its oldest).
                let now = crate::clock::now_ms();
                let since = now.saturating_sub(retention.as_millis() as u64);
                let count: Option<u64> = redis::cmd("GET")
                    .arg(Self::counter_key(prefix))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                let Some(count) = count.filter(|&c| c > 0) else {
                    return Ok((Vec::new(), 0));
                };
                let size = bucket_size(*max_len);
                let newest = (count - 1) / size;
                // The stream keeps about max_len (`MAXLEN ~` keeps a little more): one bucket more than it needs.
                let oldest = (count.saturating_sub(*max_len as u64) / size).saturating_sub(1);
                let min = [b"[", id.as_bytes(), b"\0"].concat();
                let max = [b"[", id.as_bytes(), b"\0\xff"].concat();
                let mut pipe = redis::pipe();
                for bucket in (oldest..=newest).rev() {
                    pipe.cmd("ZRANGEBYLEX")
                        .arg(format!("{}{bucket}", Self::index_prefix(prefix)))
                        .arg(&min)
                        .arg(&max);
                }
                let buckets: Vec<Vec<Vec<u8>>> =
                    pipe.query_async(&mut conn).await.map_err(|e| Failure::from_redis(&e))?;
                let mut ids: Vec<(u64, u64, String)> = buckets
                    .into_iter()
                    .flatten()
                    .filter_map(|member| {
                        let sid = String::from_utf8(member.get(id.len() + 1..)?.to_vec()).ok()?;
                        let (ms, seq) = sid.split_once('-')?;
                        Some((ms.parse().ok()?, seq.parse().ok()?, sid))
                    })
                    .filter(|(ms, _, _)| *ms >= since)
                    .collect();
                ids.sort_unstable_by_key(|&(ms, seq, _)| std::cmp::Reverse((ms, seq)));
                ids.dedup_by(|a, b| a.2 == b.2);
                ids.truncate(HISTORY);
                let ids: Vec<String> = ids.into_iter().map(|(_, _, sid)| sid).collect();
                if ids.is_empty() {
                    return Ok((Vec::new(), 0));
                }
                let mut pipe = redis::pipe();
                for sid in &ids {
                    pipe.cmd("XRANGE").arg(Self::stream_key(prefix)).arg(sid).arg(sid);
                }
                let found: Vec<Vec<StreamEntry>> =
                    pipe.query_async(&mut conn).await.map_err(|e| Failure::from_redis(&e))?;
                let entries: Vec<Entry> = found.into_iter().flatten().filter_map(|e| parse(&e)).collect();
                let trimmed = ids.len() - entries.len();
                Ok((entries, trimmed))
            }
            Store::Memory { ring, .. } => {
                let ring = ring.lock().unwrap_or_else(|e| e.into_inner());
                let entries = ring
                    .1
                    .iter()
                    .rev()
                    .filter(|e| e.ids().contains(&id))
                    .take(HISTORY)
                    .cloned()
                    .collect();
                Ok((entries, 0))
            }
        }
    }

    /// The newest `n` entries, newest first (the console's "pick a recent event").
    pub async fn recent(&self, n: usize) -> Result<Vec<Entry>, Failure> {
        match self {
            Store::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                let found: Vec<StreamEntry> = redis::cmd("XREVRANGE")
                    .arg(Self::stream_key(prefix))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(n)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(found.iter().filter_map(parse).collect())
            }
            Store::Memory { ring, .. } => {
                let ring = ring.lock().unwrap_or_else(|e| e.into_inner());
                Ok(ring.1.iter().rev().take(n).cloned().collect())
            }
        }
    }

    /// Entries after `after` (a stream id; `$` for only new ones), waiting up to `block` for the first. Redis only.
    pub async fn read_after(&self, after: &str, block: Duration) -> Result<Vec<Entry>, Failure> {
        let Store::Redis { conn, prefix, .. } = self else {
            return Ok(Vec::new());
        };
        let mut conn = conn.clone();
        let reply: Option<Vec<(String, Vec<StreamEntry>)>> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(500)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(Self::stream_key(prefix))
            .arg(after)
            .query_async(&mut conn)
            .await
            .map_err(|e| Failure::from_redis(&e))?;
        Ok(reply
            .unwrap_or_default()
            .into_iter()
            .flat_map(|(_, entries)| entries)
            .filter_map(|e| parse(&e))
            .collect())
    }

    /// Entries ever added to the stream (Redis' `entries-added`, which trimming does not lower).
    pub async fn added(&self) -> Result<u64, Failure> {
        let Store::Redis { conn, prefix, .. } = self else {
            return Ok(0);
        };
        let mut conn = conn.clone();
        let info: redis::Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(Self::stream_key(prefix))
            .query_async(&mut conn)
            .await
            .or_else(|e| match e.code() {
                // No stream yet: nothing was added.
                Some("ERR") => Ok(redis::Value::Nil),
                _ => Err(e),
            })
            .map_err(|e| Failure::from_redis(&e))?;
        let pairs: Vec<(String, redis::Value)> = match info {
            redis::Value::Map(map) => map
                .into_iter()
                .filter_map(|(k, v)| Some((redis::from_redis_value::<String>(k).ok()?, v)))
                .collect(),
            redis::Value::Array(items) => items
                .chunks(2)
                .filter_map(|kv| {
                    Some((
                        redis::from_redis_value::<String>(kv[0].clone()).ok()?,
                        kv.get(1)?.clone(),
                    ))
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(pairs
            .into_iter()
            .find(|(k, _)| k == "entries-added")
            .and_then(|(_, v)| redis::from_redis_value::<u64>(v).ok())
            .unwrap_or(0))
    }

    /// Entries after the stream id `after`.
    pub async fn count_after(&self, after: &str) -> Result<u64, Failure> {
        let Store::Redis { conn, prefix, .. } = self else {
            return Ok(0);
        };
        let mut conn = conn.clone();
        let ids: Vec<StreamEntry> = redis::cmd("XRANGE")
            .arg(Self::stream_key(prefix))
            .arg(format!("({after}"))
            .arg("+")
            .query_async(&mut conn)
            .await
            .map_err(|e| Failure::from_redis(&e))?;
        Ok(ids.len() as u64)
    }

    /// The id of the newest entry (`0-0` when empty): where a tap starts.
    pub async fn last_id(&self) -> Result<String, Failure> {
        let Store::Redis { conn, prefix, .. } = self else {
            return Ok("0-0".into());
        };
        let mut conn = conn.clone();
        let last: Vec<StreamEntry> = redis::cmd("XREVRANGE")
            .arg(Self::stream_key(prefix))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(|e| Failure::from_redis(&e))?;
        Ok(last.into_iter().next().map_or_else(|| "0-0".into(), |(id, _)| id))
    }
}

fn parse((id, fields): &StreamEntry) -> Option<Entry> {
    let json = fields.iter().find(|(k, _)| k == "entry")?;
    let mut entry: Entry = serde_json::from_str(&json.1).ok()?;
    entry.id = Some(id.clone());
    Some(entry)
}

enum Msg {
    Entry(Box<Entry>),
    Flush(oneshot::Sender<()>),
}

/// The journal the pipeline writes to: a queue in front of one writer task.
pub struct Journal {
    tx: mpsc::Sender<Msg>,
    pub store: Arc<Store>,
    /// Every entry as it is recorded, for live readers of this process (the HTTP listener's tap).
    pub live: broadcast::Sender<Arc<Entry>>,
    /// Fields masked in every entry.
    pub mask: Vec<String>,
    /// Entries dropped so far (a full queue, a Redis that stayed away), as `switchyard_journal_dropped_total`.
    dropped: Arc<AtomicU64>,
}

impl Journal {
    /// Starts the writer task (on the current Tokio runtime).
    pub fn start(store: Store, mask: Vec<String>) -> Journal {
        let (tx, mut rx) = mpsc::channel::<Msg>(QUEUE);
        let store = Arc::new(store);
        let writer = store.clone();
        let dropped = Arc::new(AtomicU64::new(0));
        let lost = dropped.clone();
        // Ends when every `Journal` (its sender) is gone and the queue is drained.
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            let mut entries = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                let mut flushed = Vec::new();
                for msg in batch.drain(..) {
                    match msg {
                        Msg::Entry(e) => entries.push(*e),
                        Msg::Flush(done) => flushed.push(done),
                    }
                }
                if !entries.is_empty() {
                    write(&writer, &entries, &lost).await;
                    entries.clear();
                }
                for done in flushed {
                    let _ = done.send(());
                }
            }
        });
        Journal {
            tx,
            store,
            live: broadcast::Sender::new(1_024),
            mask,
            dropped,
        }
    }

    /// Hands an entry to the writer; never waits. A full queue drops it (counted).
    pub fn record(&self, entry: Entry) {
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(Arc::new(entry.clone()));
        }
        if self.tx.try_send(Msg::Entry(Box::new(entry))).is_err() {
            metrics::counter!(m::JOURNAL_DROPPED).increment(1);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many entries were dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every entry recorded so far is stored (or given up on).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// Stores a batch, retrying a little while Redis is away; then drops it (counted): the journal is history, the
/// dead letters and positions are what keep events from being lost.
async fn write(store: &Store, entries: &[Entry], dropped: &AtomicU64) {
    for attempt in 0..3u32 {
        match store.append(entries, crate::clock::now_ms()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, entries = entries.len(), attempt, "Journal write failed.");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    }
    metrics::counter!(m::JOURNAL_DROPPED).increment(entries.len() as u64);
    dropped.fetch_add(entries.len() as u64, Ordering::Relaxed);
}

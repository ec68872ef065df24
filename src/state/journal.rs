//! The decision journal: one entry per decided event (what every route on its channel did, and what the actions
//! returned), for `switchyard why` and `switchyard tap`.
//!
//! The pipeline hands entries over without waiting ([`Journal::record`]); one writer task stores them in batches.
//! In the main Redis, each batch is one item of the stream `{prefix}journal` (its entries as a JSON array; the
//! stream is trimmed to `max_len` entries and to the retention), and then the batch goes into the index of its run
//! of consecutive entries (a bucket, expiring a retention after its last write and deleted once the cap has trimmed
//! its entries): `record-id \0 stream-id` for each distinct record id into the sorted set `{prefix}journal:idx:{n}`,
//! so that one record's history is found in O(log n) per bucket, and each event id and idempotency key into the
//! hash `{prefix}journal:keys:{n}`, which names the item of its newest entry in the bucket; the rest of its history
//! is its records'. Without Redis, a bounded ring in memory. A journal that falls behind drops entries and counts
//! them (`switchyard_journal_dropped_total`): it never slows delivery.

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
/// Entries per stream item (one write): small enough that `why` reading a record's items stays quick.
const BATCH: usize = 128;
/// How long the writer waits for a batch to fill after its first entry: an entry is in `why` and `tap` this much
/// later at most (plus the write), and under load every write carries a full batch.
const LINGER: Duration = Duration::from_millis(50);
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
        for key in self.idempotency_keys() {
            if !ids.contains(&key) {
                ids.push(key);
            }
        }
        ids
    }

    /// Where [`Store::index`] puts the entry's ids: its record ids into `members` (the sorted set), its event id
    /// and idempotency keys into `fields` (the hash), found through its record ids. Input rejected before routing
    /// names no record: its event id and position are members.
    fn index_ids<'a>(&'a self, members: &mut Vec<&'a str>, fields: &mut Vec<&'a str>) {
        if self.record_ids.is_empty() {
            members.extend(self.ids());
            return;
        }
        members.extend(self.record_ids.iter().map(String::as_str));
        fields.push(&self.event_id);
        fields.extend(self.idempotency_keys());
    }

    /// Its actions' idempotency keys, in order (repeats included).
    fn idempotency_keys(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .flat_map(|r| &r.actions)
            .filter_map(|a| a.idempotency_key.as_deref())
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

/// Appends a written batch as one stream item: `KEYS` = the stream, the entry counter and the items' first
/// entries; `ARGV` = max_len, the oldest time kept (ms), the batch's entry count and its entries (a JSON array).
/// Returns the item's stream id and the number of its first entry.
///
/// One item per batch, not per entry: one `XADD` of a few hundred KB costs Redis a fraction of a hundred small
/// ones. The cap is in entries: the sorted set `{prefix}journal:items` scores each item by the number of its first
/// entry, so that the item holding the entry `max_len` back from the newest is found in O(log n), and every item
/// before it is trimmed (`MINID`, exact: the stream keeps at most one batch past the cap). The retention trims by
/// time (`MINID ~`). Keys share the prefix's hash tag (validated on a Cluster), so they live in one slot.
static APPEND: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local maxlen, minms, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local first = redis.call('INCRBY', KEYS[2], n) - n
local sid = redis.call('XADD', KEYS[1], '*', 'n', n, 'first', first, 'entries', ARGV[4])
redis.call('ZADD', KEYS[3], first, sid)
local cut = first + n - maxlen
if cut > 0 then
  local keep = redis.call('ZREVRANGEBYSCORE', KEYS[3], cut, '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #keep > 0 then
    redis.call('XTRIM', KEYS[1], 'MINID', keep[1])
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. keep[2])
  end
end
redis.call('XTRIM', KEYS[1], 'MINID', '~', minms)
return {sid, first}
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

    /// The prefix of the index buckets' hashes of event ids and idempotency keys (the bucket number follows).
    pub fn keys_prefix(prefix: &str) -> String {
        format!("{prefix}journal:keys:")
    }

    /// The counter of entries ever appended, which numbers them for the index buckets.
    pub fn counter_key(prefix: &str) -> String {
        format!("{prefix}journal:seq")
    }

    /// The items' first entries (see [`APPEND`]).
    pub fn items_key(prefix: &str) -> String {
        format!("{prefix}journal:items")
    }

    /// Stores `entries` as one item (the first of the two writes of a batch): its stream id and first entry's
    /// number, which [`Store::index`] needs. Memory: the whole write.
    async fn append(&self, entries: &[Entry], now_ms: u64) -> Result<Appended, Failure> {
        match self {
            Store::Redis {
                conn,
                prefix,
                max_len,
                retention,
            } => {
                let mut payload = Vec::with_capacity(entries.len() * 512);
                payload.push(b'[');
                for (i, entry) in entries.iter().enumerate() {
                    if i > 0 {
                        payload.push(b',');
                    }
                    serde_json::to_writer(&mut payload, entry).map_err(|e| Failure::Permanent(e.to_string()))?;
                }
                payload.push(b']');
                let mut conn = conn.clone();
                let (sid, first): (String, u64) = APPEND
                    .key(Self::stream_key(prefix))
                    .key(Self::counter_key(prefix))
                    .key(Self::items_key(prefix))
                    .arg(*max_len)
                    .arg(now_ms.saturating_sub(retention.as_millis() as u64))
                    .arg(entries.len())
                    .arg(payload)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(Appended::Item { sid, first })
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
                Ok(Appended::Stored)
            }
        }
    }

    /// Indexes a stored item (the second write of a batch), in the bucket of its first entry. The sorted set
    /// holds `record-id \0 stream-id` for each distinct record id of its entries (and, for input rejected before
    /// routing, which names no record, its event id and position), all of score 0, so that `ZRANGEBYLEX` finds a
    /// record's items in O(log n) per bucket. The bucket's hash maps each event id and idempotency key to the item:
    /// a field costs Redis less than a set member (the index's Redis time is 15 % lower so), and `why` on one of
    /// them finds its entry there, then the rest of its history through the entry's record ids
    /// ([`Store::history`]). Plain commands built here (no
    /// script): Redis does nothing per member but the insert, and serves other clients between the commands. Both
    /// expire a retention after their last write, and are deleted as soon as the cap has trimmed every entry they
    /// name, so the index never outgrows the stream.
    async fn index(&self, entries: &[Entry], sid: &str, first: u64) -> Result<(), Failure> {
        let Store::Redis {
            conn,
            prefix,
            max_len,
            retention,
        } = self
        else {
            return Ok(());
        };
        let size = bucket_size(*max_len);
        let bucket = format!("{}{}", Self::index_prefix(prefix), first / size);
        let keys = format!("{}{}", Self::keys_prefix(prefix), first / size);
        let mut members = Vec::with_capacity(entries.len());
        let mut fields = Vec::with_capacity(entries.len() * 2);
        for entry in entries {
            entry.index_ids(&mut members, &mut fields);
        }
        members.sort_unstable();
        members.dedup();
        fields.sort_unstable();
        fields.dedup();
        let mut pipe = redis::pipe();
        for chunk in members.chunks(1_024) {
            let zadd = pipe.cmd("ZADD").arg(&bucket);
            for id in chunk {
                let mut member = Vec::with_capacity(id.len() + 1 + sid.len());
                member.extend_from_slice(id.as_bytes());
                member.push(0);
                member.extend_from_slice(sid.as_bytes());
                zadd.arg(0).arg(member);
            }
            zadd.ignore();
        }
        for chunk in fields.chunks(1_024) {
            let hset = pipe.cmd("HSET").arg(&keys);
            for id in chunk {
                hset.arg(*id).arg(sid);
            }
            hset.ignore();
        }
        let ttl = retention.as_millis() as u64;
        for key in [&bucket, &keys] {
            pipe.cmd("PEXPIRE").arg(key).arg(ttl).ignore();
        }
        // The buckets whose every entry is past the cap: gone with them (those this batch moved past it).
        let (end, cap, size) = (first as i64 + entries.len() as i64, *max_len as i64, size as i64);
        let stale = (end - cap).div_euclid(size) - 1;
        for b in ((first as i64 - cap).div_euclid(size) - 1).max(0)..=stale {
            pipe.cmd("UNLINK")
                .arg(format!("{}{b}", Self::index_prefix(prefix)))
                .arg(format!("{}{b}", Self::keys_prefix(prefix)))
                .ignore();
        }
        let mut conn = conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| Failure::from_redis(&e))
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
                let buckets = (oldest..=newest).rev();
                let stream = Self::stream_key(prefix);
                let (mut sids, fields) = lookup(&mut conn, prefix, buckets.clone(), &[id], true).await?;
                if !fields.is_empty() {
                    // An event id or idempotency key: its newest entry in each bucket, then its records' histories,
                    // which hold every entry of it (an action's key is its record's; so is a redelivered event).
                    let (found, _) = read_items(&mut conn, &stream, &fields, id).await?;
                    let mut records: Vec<&str> = found
                        .iter()
                        .flat_map(|e| e.record_ids.iter().map(String::as_str))
                        .collect();
                    records.sort_unstable();
                    records.dedup();
                    sids.extend(lookup(&mut conn, prefix, buckets, &records, false).await?.0);
                    sids.extend(fields);
                }
                let sids = newest_first(sids, since);
                read_items(&mut conn, &stream, &sids, id).await
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
                Ok(found
                    .iter()
                    .flat_map(|item| parse(item).into_iter().rev())
                    .take(n)
                    .collect())
            }
            Store::Memory { ring, .. } => {
                let ring = ring.lock().unwrap_or_else(|e| e.into_inner());
                Ok(ring.1.iter().rev().take(n).cloned().collect())
            }
        }
    }

    /// Entries after the stream item `after` (`$` for only new ones), waiting up to `block` for the first, with
    /// the id of the last item read (where to read on from; `after` when none came). Redis only.
    pub async fn read_after(&self, after: &str, block: Duration) -> Result<(String, Vec<Entry>), Failure> {
        let Store::Redis { conn, prefix, .. } = self else {
            return Ok((after.to_string(), Vec::new()));
        };
        let mut conn = conn.clone();
        let reply: Option<Vec<(String, Vec<StreamEntry>)>> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(8)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(Self::stream_key(prefix))
            .arg(after)
            .query_async(&mut conn)
            .await
            .map_err(|e| Failure::from_redis(&e))?;
        let items: Vec<StreamEntry> = reply
            .unwrap_or_default()
            .into_iter()
            .flat_map(|(_, items)| items)
            .collect();
        let cursor = items.last().map_or_else(|| after.to_string(), |(sid, _)| sid.clone());
        Ok((cursor, items.iter().flat_map(parse).collect()))
    }

    /// Entries ever added to the journal (its counter, which trimming does not lower).
    pub async fn added(&self) -> Result<u64, Failure> {
        let Store::Redis { conn, prefix, .. } = self else {
            return Ok(0);
        };
        let mut conn = conn.clone();
        let added: Option<u64> = redis::cmd("GET")
            .arg(Self::counter_key(prefix))
            .query_async(&mut conn)
            .await
            .map_err(|e| Failure::from_redis(&e))?;
        Ok(added.unwrap_or(0))
    }

    /// Entries in the items after the stream item `after`.
    pub async fn count_after(&self, after: &str) -> Result<u64, Failure> {
        let Store::Redis { conn, prefix, .. } = self else {
            return Ok(0);
        };
        let mut conn = conn.clone();
        let items: Vec<StreamEntry> = redis::cmd("XRANGE")
            .arg(Self::stream_key(prefix))
            .arg(format!("({after}"))
            .arg("+")
            .query_async(&mut conn)
            .await
            .map_err(|e| Failure::from_redis(&e))?;
        Ok(items.iter().map(item_len).sum())
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

/// The stream ids of the items that `buckets` of the index name for `ids`: those of the sorted sets (record ids),
/// and with `fields`, those of the hashes (event ids and idempotency keys), in one pipelined round trip.
async fn lookup(
    conn: &mut Conn,
    prefix: &str,
    buckets: impl Iterator<Item = u64>,
    ids: &[&str],
    fields: bool,
) -> Result<(Vec<String>, Vec<String>), Failure> {
    let mut pipe = redis::pipe();
    // Per command: the length of the id a sorted set's members start with, or None for a hash's field.
    let mut asked = Vec::new();
    for bucket in buckets {
        for id in ids {
            pipe.cmd("ZRANGEBYLEX")
                .arg(format!("{}{bucket}", Store::index_prefix(prefix)))
                .arg([b"[", id.as_bytes(), b"\0"].concat())
                .arg([b"[", id.as_bytes(), b"\0\xff"].concat());
            asked.push(Some(id.len()));
            if fields {
                pipe.cmd("HGET")
                    .arg(format!("{}{bucket}", Store::keys_prefix(prefix)))
                    .arg(*id);
                asked.push(None);
            }
        }
    }
    if asked.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let replies: Vec<redis::Value> = pipe.query_async(conn).await.map_err(|e| Failure::from_redis(&e))?;
    let parsing = |e: redis::ParsingError| Failure::from_redis(&e.into());
    let (mut members, mut found) = (Vec::new(), Vec::new());
    for (reply, asked) in replies.into_iter().zip(asked) {
        match asked {
            Some(len) => {
                let named: Vec<Vec<u8>> = redis::from_redis_value(reply).map_err(parsing)?;
                members.extend(
                    named
                        .into_iter()
                        .filter_map(|m| String::from_utf8(m.get(len + 1..)?.to_vec()).ok()),
                );
            }
            None => found.extend(redis::from_redis_value::<Option<String>>(reply).map_err(parsing)?),
        }
    }
    Ok((members, found))
}

/// Stream ids newest first, without repeats or those older than `since` (ms), at most [`HISTORY`].
fn newest_first(sids: Vec<String>, since: u64) -> Vec<String> {
    let mut ids: Vec<(u64, u64, String)> = sids
        .into_iter()
        .filter_map(|sid| {
            let (ms, seq) = sid.split_once('-')?;
            Some((ms.parse().ok()?, seq.parse().ok()?, sid))
        })
        .filter(|(ms, _, _)| *ms >= since)
        .collect();
    ids.sort_unstable_by_key(|&(ms, seq, _)| std::cmp::Reverse((ms, seq)));
    ids.dedup_by(|a, b| a.2 == b.2);
    ids.truncate(HISTORY);
    ids.into_iter().map(|(_, _, sid)| sid).collect()
}

/// The entries for `id` in the stream items `sids` (newest first), newest first, and how many of the items the cap
/// trimmed since the index named them.
async fn read_items(conn: &mut Conn, stream: &str, sids: &[String], id: &str) -> Result<(Vec<Entry>, usize), Failure> {
    if sids.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let mut pipe = redis::pipe();
    for sid in sids {
        pipe.cmd("XRANGE").arg(stream).arg(sid).arg(sid);
    }
    let found: Vec<Vec<StreamEntry>> = pipe.query_async(conn).await.map_err(|e| Failure::from_redis(&e))?;
    // Each item still there holds one or more of the id's entries among those of its batch.
    let trimmed = found.iter().filter(|item| item.is_empty()).count();
    let mut entries: Vec<Entry> = found
        .iter()
        .flatten()
        .flat_map(|item| parse(item).into_iter().rev())
        .filter(|entry| entry.ids().contains(&id))
        .collect();
    entries.truncate(HISTORY);
    Ok((entries, trimmed))
}

/// The entries of one stream item, oldest first, each with the id `{stream id}.{n}` (its place in the item).
/// An item written before batches were items (one `entry` field) reads as that one entry.
fn parse((sid, fields): &StreamEntry) -> Vec<Entry> {
    let mut entries: Vec<Entry> = match fields.iter().find(|(k, _)| k == "entries" || k == "entry") {
        Some((k, json)) if k == "entries" => serde_json::from_str(json).unwrap_or_default(),
        Some((_, json)) => serde_json::from_str(json).map(|e| vec![e]).unwrap_or_default(),
        None => Vec::new(),
    };
    for (i, entry) in entries.iter_mut().enumerate() {
        entry.id = Some(format!("{sid}.{i}"));
    }
    entries
}

/// How many entries an item holds, from its `n` field (without parsing them; an item of an earlier version, one).
fn item_len((_, fields): &StreamEntry) -> u64 {
    fields
        .iter()
        .find(|(k, _)| k == "n")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(1)
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
            let mut entries = Vec::with_capacity(BATCH);
            let mut flushed = Vec::new();
            // In memory a write is a push: nothing to save by waiting, and `why` finds what `tap` showed at once.
            let linger = match *writer {
                Store::Redis { .. } => LINGER,
                Store::Memory { .. } => Duration::ZERO,
            };
            while gather(&mut rx, linger, &mut entries, &mut flushed).await {
                if !entries.is_empty() {
                    write(&writer, &entries, &lost).await;
                    entries.clear();
                }
                for done in flushed.drain(..) {
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

/// Waits for the next batch: the first message, then more until the batch is full, a flush is asked for, the
/// queue is closed or `linger` has passed since the first (at once when it is zero). False when the queue is
/// closed and drained.
///
/// Lingering is what makes the batches full under load: without it the writer takes whatever a few events left in
/// the queue (about 9 entries a batch in `cargo bench --bench e2e`), and pays the item's script, its index and
/// two round trips for each handful.
async fn gather(
    rx: &mut mpsc::Receiver<Msg>,
    linger: Duration,
    entries: &mut Vec<Entry>,
    flushed: &mut Vec<oneshot::Sender<()>>,
) -> bool {
    let mut batch = Vec::with_capacity(BATCH);
    if rx.recv_many(&mut batch, BATCH).await == 0 {
        return false;
    }
    let deadline = tokio::time::Instant::now() + linger;
    loop {
        for msg in batch.drain(..) {
            match msg {
                Msg::Entry(e) => entries.push(*e),
                Msg::Flush(done) => flushed.push(done),
            }
        }
        if entries.len() >= BATCH || !flushed.is_empty() || linger.is_zero() {
            return true;
        }
        match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, BATCH - entries.len())).await {
            Ok(n) if n > 0 => continue,
            // Closed (the entries gathered are still written) or the linger is over.
            Ok(_) | Err(_) => return true,
        }
    }
}

/// What [`Store::append`] did: stored the entries as a Redis stream item still to index, or stored them whole.
enum Appended {
    Item { sid: String, first: u64 },
    Stored,
}

/// Stores a batch (the item, then its index), retrying a little while Redis is away, each write on its own (an
/// item is never appended twice); then drops it (counted): the journal is history, the dead letters and positions
/// are what keep events from being lost. A batch stored but never indexed is counted too: `why` cannot find it.
async fn write(store: &Store, entries: &[Entry], dropped: &AtomicU64) {
    let mut item = None;
    let mut attempt = 0u32;
    loop {
        let step = match &item {
            None => store.append(entries, crate::clock::now_ms()).await.map(Some),
            Some(Appended::Item { sid, first }) => store.index(entries, sid, *first).await.map(|()| None),
            Some(Appended::Stored) => return,
        };
        match step {
            Ok(Some(appended)) => item = Some(appended),
            Ok(None) => return,
            Err(e) => {
                let indexing = item.is_some();
                tracing::warn!(error = %e, entries = entries.len(), attempt, indexing, "Journal write failed.");
                attempt += 1;
                if attempt == 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200 << (attempt - 1))).await;
            }
        }
    }
    metrics::counter!(m::JOURNAL_DROPPED).increment(entries.len() as u64);
    dropped.fetch_add(entries.len() as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(event_id: &str) -> Entry {
        Entry {
            id: None,
            at_ms: 1,
            event_id: event_id.into(),
            channel: "/data/OrderChangeEvent".into(),
            change_type: None,
            commit_user: None,
            record_ids: Vec::new(),
            position: "p".into(),
            rules_version: "v".into(),
            routes: Vec::new(),
            rejected: None,
            event: Event::default(),
        }
    }

    #[test]
    fn an_item_reads_as_its_batch_and_an_earlier_versions_item_as_one_entry() {
        let batch = serde_json::to_string(&[entry("a"), entry("b")]).unwrap();
        let item = (
            "5-0".to_string(),
            vec![("n".into(), "2".into()), ("entries".into(), batch)],
        );
        let read = parse(&item);
        let ids: Vec<_> = read.iter().map(|e| (e.event_id.as_str(), e.id.as_deref())).collect();
        assert_eq!(ids, [("a", Some("5-0.0")), ("b", Some("5-0.1"))]);
        assert_eq!(item_len(&item), 2);

        let old = (
            "4-0".to_string(),
            vec![("entry".into(), serde_json::to_string(&entry("c")).unwrap())],
        );
        assert_eq!(parse(&old)[0].event_id, "c");
        assert_eq!(item_len(&old), 1);
    }
}

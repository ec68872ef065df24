//! The one failure type of delivery: transient (retry), dropped (retry at once), permanent (dead-letter) or
//! fenced (abandon: another replica holds the lease). The dispatcher decides retry policy from it, never from
//! strings (STYLE.md, after arroyo).

/// Why a call to Redis, a sink or a store failed, and whether trying again can help. The error of every step
/// of delivery: sinks, idempotency markers, leases, checkpoints and dead letters.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Failure {
    /// The sink or its connection failed for now (connection refused, timeout, Redis LOADING, a primary turned
    /// replica in a failover: READONLY): retry.
    #[error("transient: {0}")]
    Transient(String),
    /// An established connection died mid-call (broken pipe, reset): transient, and retried at once, since the
    /// connection is being replaced already; waiting would only let the next drop catch the retry too.
    #[error("transient: {0}")]
    Dropped(String),
    /// The action cannot succeed as it is (a wrong type, a refused id): dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
    /// This replica lost the channel lease the event came under: the action is abandoned, neither retried nor
    /// dead-lettered; the replica that holds the lease now redelivers the event.
    #[error("fenced: {0}")]
    Fenced(String),
}

impl Failure {
    pub fn is_transient(&self) -> bool {
        matches!(self, Failure::Transient(_) | Failure::Dropped(_))
    }

    /// The same error, its message prefixed with the step that failed (e.g. `idempotency claim`).
    pub fn context(self, step: &str) -> Failure {
        match self {
            Failure::Transient(m) => Failure::Transient(format!("{step}: {m}")),
            Failure::Dropped(m) => Failure::Dropped(format!("{step}: {m}")),
            Failure::Permanent(m) => Failure::Permanent(format!("{step}: {m}")),
            Failure::Fenced(m) => Failure::Fenced(format!("{step}: {m}")),
        }
    }

    /// Redis errors: connection-level problems and a server that is loading or busy are transient.
    pub fn from_redis(err: &redis::RedisError) -> Failure {
        let established_dropped = err.is_connection_dropped() && !err.is_connection_refusal();
        if established_dropped {
            return Failure::Dropped(err.to_string());
        }
        let transient = err.is_io_error()
            || err.is_connection_refusal()
            || err.is_connection_dropped()
            || err.is_timeout()
            || matches!(
                err.code(),
                Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" | "READONLY" | "NOREPLICAS")
            )
            || err.is_unrecoverable_error();
        if transient {
            Failure::Transient(err.to_string())
        } else {
            Failure::Permanent(err.to_string())
        }
    }
}

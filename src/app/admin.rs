//! `switchyard checkpoint`, `dead-letter` and `route`: operator commands against a config's stores.

use std::io::Write;

use serde_json::Value;

use crate::app::cli::{CheckpointOp, DeadLetterOp, RouteOp};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::delivery::ActionResult;
use crate::delivery::Pipeline;
use crate::plan::{Action, Op};
use crate::rules::RuleSet;
use crate::state::Stores;
use crate::state::{DeadLetter, Pause};
use crate::state::{describe_position as describe, offset_bytes};

/// What the operator commands act on: the CLI builds it from a [`crate::app::service::Service`], the HTTP listener
/// keeps one, so both run the same code.
#[derive(Clone)]
pub struct Ops {
    pub stores: Arc<Stores>,
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub pipeline: Arc<Pipeline>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Checkpoint(#[from] crate::state::CheckpointError),
    #[error(transparent)]
    Store(#[from] crate::failure::Failure),
}

pub async fn checkpoint(service: &Ops, op: CheckpointOp, out: &mut impl Write) -> Result<(), AdminError> {
    let store = &service.stores.checkpoints;
    match op {
        CheckpointOp::Show => {
            let all = store.list().await?;
            if all.is_empty() {
                let _ = writeln!(out, "no stored positions");
            }
            for (key, bytes) in all {
                let _ = writeln!(out, "{key}\t{}", describe(&key, &bytes));
            }
        }
        CheckpointOp::Set { key, value } => {
            let bytes = match value.strip_prefix("offset:") {
                Some(n) => offset_bytes(
                    n.parse()
                        .map_err(|_| AdminError::Usage(format!("`{n}` is not a byte offset")))?,
                ),
                None => crate::hex::decode(value.trim())
                    .ok_or_else(|| AdminError::Usage(format!("`{value}` is not hex bytes or offset:N")))?,
            };
            refuse_while_leased(service, &key).await?;
            store.set(&key, &bytes).await?;
            let _ = writeln!(out, "{key}\t{}", describe(&key, &bytes));
        }
        CheckpointOp::Reset { key } => {
            refuse_while_leased(service, &key).await?;
            store.reset(&key).await?;
            let _ = writeln!(out, "{key}\treset");
        }
    }
    Ok(())
}

/// A position moved while a replica holds its channel's lease would be overwritten by that replica's next commit
/// (its fenced writes still pass): refuse, and say who holds it.
async fn refuse_while_leased(service: &Ops, key: &str) -> Result<(), AdminError> {
    let Some(leases) = &service.stores.leases else {
        return Ok(());
    };
    match leases.holder(key).await? {
        Some((instance, left)) => Err(AdminError::Usage(format!(
            "`{key}` is in use: replica `{instance}` holds its lease ({} ms left unless renewed), and its next \
             commit would overwrite this position; stop every replica of this config first (SIGTERM hands the \
             lease back at once), then try again",
            left.as_millis()
        ))),
        None => Ok(()),
    }
}

/// `switchyard route list|pause|resume`: the pauses live in the config's Redis, so every replica obeys them.
pub async fn route(service: &Ops, op: RouteOp, out: &mut impl Write) -> Result<(), AdminError> {
    let pauses = &service.stores.pauses;
    let rules = service.rules.load_full();
    let known = |name: &str| -> Result<(), AdminError> {
        if rules.routes.iter().any(|r| r.name == name) {
            return Ok(());
        }
        let names: Vec<&str> = rules.routes.iter().map(|r| r.name.as_str()).collect();
        Err(AdminError::Usage(format!(
            "no route `{name}` in the rules of this config (routes: {})",
            names.join(", ")
        )))
    };
    match op {
        RouteOp::List => {
            let paused = pauses.list().await?;
            let default = service.pipeline.route_limit;
            let _ = writeln!(out, "route\tchannel\tlimit\tstate");
            for route in &rules.routes {
                let limit = match (route.limit, default) {
                    (Some(l), _) => l.to_string(),
                    (None, Some(l)) => format!("{l} (config)"),
                    (None, None) => "none".into(),
                };
                let state = match paused.get(&route.name) {
                    Some(p) => format!("PAUSED since {} by {}: {}", crate::clock::utc(p.at_ms), p.by, p.reason),
                    None if !rules.is_live(route) => "not live in this mode".into(),
                    None => "running".into(),
                };
                let _ = writeln!(out, "{}\t{}\t{limit}\t{state}", route.name, route.channel);
            }
            // A pause of a route the current rules no longer have still holds if the route comes back.
            for (name, p) in paused
                .iter()
                .filter(|(n, _)| !rules.routes.iter().any(|r| &r.name == *n))
            {
                let _ = writeln!(out, "{name}\t-\t-\tPAUSED (not in the current rules): {}", p.reason);
            }
        }
        RouteOp::Pause { name } => {
            known(&name)?;
            let pause = Pause {
                reason: "route paused by an operator".into(),
                at_ms: crate::clock::now_ms(),
                by: "operator".into(),
            };
            if pauses.pause(&name, &pause).await? {
                let _ = writeln!(
                    out,
                    "{name}\tpaused: its actions are dead-lettered on every replica until `switchyard route resume {name}`"
                );
            } else {
                let _ = writeln!(out, "{name}\talready paused");
            }
        }
        RouteOp::Resume { name } => {
            if pauses.resume(&name).await? {
                let letters = service
                    .stores
                    .dead_letters
                    .list()
                    .await?
                    .iter()
                    .filter(|(_, l)| l.get("route").and_then(Value::as_str) == Some(name.as_str()))
                    .count();
                let _ = writeln!(
                    out,
                    "{name}\tresumed; {letters} dead letter(s) of this route wait: `switchyard dead-letter retry --all` runs them"
                );
            } else {
                known(&name)?;
                let _ = writeln!(out, "{name}\tnot paused");
            }
        }
    }
    Ok(())
}

fn summary(id: &str, letter: &Value) -> String {
    let s = |k: &str| letter.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    format!(
        "{id}\t{}\t{}\t{}\t{}",
        letter.get("at_ms").and_then(Value::as_u64).unwrap_or(0),
        s("route"),
        s("event_id"),
        s("reason")
    )
}

pub async fn dead_letter(service: &Ops, op: DeadLetterOp, out: &mut impl Write) -> Result<bool, AdminError> {
    let store = &service.stores.dead_letters;
    let all = store.list().await?;
    let pick = |ids: &[String], every: bool| -> Result<Vec<(String, Value)>, AdminError> {
        if every {
            return Ok(all.clone());
        }
        if ids.is_empty() {
            return Err(AdminError::Usage("name dead-letter ids, or --all".into()));
        }
        ids.iter()
            .map(|id| {
                all.iter()
                    .find(|(i, _)| i == id)
                    .cloned()
                    .ok_or_else(|| AdminError::Usage(format!("no dead letter `{id}`")))
            })
            .collect()
    };
    match op {
        DeadLetterOp::List => {
            let _ = writeln!(out, "id\tat_ms\troute\tevent_id\treason");
            for (id, letter) in &all {
                let _ = writeln!(out, "{}", summary(id, letter));
            }
            Ok(true)
        }
        DeadLetterOp::Show { id } => {
            let (_, letter) = pick(&[id], false)?.remove(0);
            let _ = writeln!(out, "{}", serde_json::to_string_pretty(&letter).unwrap_or_default());
            Ok(true)
        }
        DeadLetterOp::Purge { ids, all: every } => {
            let chosen: Vec<String> = pick(&ids, every)?.into_iter().map(|(id, _)| id).collect();
            let n = store.delete(&chosen).await?;
            let _ = writeln!(out, "purged {n} dead letter(s)");
            Ok(true)
        }
        DeadLetterOp::Retry { ids, all: every } => {
            let mut all_ok = true;
            let paused = service.stores.pauses.list().await?;
            for (id, value) in pick(&ids, every)? {
                let route = value.get("route").and_then(Value::as_str).unwrap_or_default();
                if let Some(p) = paused.get(route) {
                    let _ = writeln!(
                        out,
                        "{id}\tnot retried: route `{route}` is paused ({}); fix it, `switchyard route resume {route}`, then retry",
                        p.reason
                    );
                    all_ok = false;
                    continue;
                }
                let ok = retry_one(service, &id, value, out).await?;
                all_ok &= ok;
            }
            Ok(all_ok)
        }
    }
}

/// Runs one dead letter again; true when it went through.
async fn retry_one(service: &Ops, id: &str, value: Value, out: &mut impl Write) -> Result<bool, AdminError> {
    let letter: DeadLetter = serde_json::from_value(value)
        .map_err(|e| AdminError::Usage(format!("dead letter `{id}` cannot be read: {e}")))?;
    let Some(mut event) = letter.event.clone() else {
        let _ = writeln!(
            out,
            "{id}\tnot retried: it holds an undecodable line, not an event; fix the source and replay it"
        );
        return Ok(false);
    };
    let rules = service.rules.load_full();
    let dispatcher = &service.pipeline.dispatcher;
    let ok = match letter
        .action
        .as_ref()
        .filter(|a| !matches!(a.op, Op::DeadLetter { .. }))
    {
        // One failed action: run exactly it again, with its idempotency key.
        Some(action) => {
            let result = dispatcher.run_action(&rules.version, &event, action, None).await;
            report(out, id, &[(action.clone(), result)])
        }
        // A failed route (or an unmatched event): the whole event again, under the current rules.
        None => {
            let plan = service.pipeline.plan_enriched(&rules, &mut event).await;
            let results = dispatcher.run(&plan, &event, None).await;
            report(out, id, &plan.actions.into_iter().zip(results).collect::<Vec<_>>())
        }
    };
    // The old entry goes either way: a new failure was written as a new dead letter. An interrupted action (the
    // command was stopped mid-retry) wrote none, so its entry stays.
    if ok != Retried::Interrupted {
        service.stores.dead_letters.delete(&[id.to_string()]).await?;
    }
    Ok(ok == Retried::Done)
}

/// How a retried dead letter ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retried {
    Done,
    /// Failed again: dead-lettered anew.
    Failed,
    /// Not finished: nothing new was written.
    Interrupted,
}

fn report(out: &mut impl Write, id: &str, results: &[(Action, ActionResult)]) -> Retried {
    let mut ok = Retried::Done;
    for (action, result) in results {
        let status = match result {
            ActionResult::Done { .. } => "done".to_string(),
            ActionResult::Skipped => "skipped: already done".to_string(),
            ActionResult::Shadow => "shadow: not sent".to_string(),
            ActionResult::Abandoned => "abandoned: the channel lease moved to another replica".to_string(),
            ActionResult::Interrupted => {
                ok = Retried::Interrupted;
                "interrupted: stopping; the dead letter is kept, try again".to_string()
            }
            ActionResult::DeadLettered { reason, .. } => {
                if ok == Retried::Done {
                    ok = Retried::Failed;
                }
                format!("failed again, dead-lettered anew: {reason}")
            }
        };
        let _ = writeln!(out, "{id}\t{}\t{status}", action.summary());
    }
    if results.is_empty() {
        let _ = writeln!(out, "{id}\tno action under the current rules");
    }
    ok
}

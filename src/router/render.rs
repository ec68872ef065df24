//! Rendering a route's action templates into actions, with the event, record and vars of one decision.

use super::RouteError;
use crate::event::OVERFLOW_PLACEHOLDER_ID;
use crate::plan::{Action, JobOptions, Op, job_id_for};
use crate::rules::template::{RenderCtx, Template, ValueTemplate};
use crate::rules::{ActionParams, ActionTemplate, Route};

/// Renders one action template of `route`.
pub(super) fn render(route: &Route, t: &ActionTemplate, ctx: &RenderCtx<'_>) -> Result<Action, RouteError> {
    let op = match &t.params {
        ActionParams::Queue {
            job,
            idempotency_key,
            job_options,
        } => enqueue(t, ctx, job, idempotency_key, job_options)?,
        ActionParams::CacheInvalidate {
            keys,
            patterns,
            publish,
        } => {
            let publish = match publish {
                Some((channel, message)) => match (channel.render_string(ctx), message.render_string(ctx)) {
                    (Ok(c), Ok(m)) => Some((c, m)),
                    (Err(missing), _) | (_, Err(missing)) => {
                        return Err(problem(t, format!("`publish` has no value for {missing}")));
                    }
                },
                None => None,
            };
            Op::Invalidate {
                keys: cache_keys(route, keys, ctx),
                patterns: cache_keys(route, patterns, ctx),
                publish,
            }
        }
        ActionParams::Log { message, level, fields } => Op::Log {
            level: *level,
            message: message.render_lossy(ctx),
            fields: fields.iter().map(|(k, v)| (k.clone(), v.render(ctx))).collect(),
        },
        ActionParams::Webhook {
            body,
            headers,
            idempotency_key,
        } => {
            let key = idempotency_key.as_ref().map(|k| key(t, k, ctx)).transpose()?;
            let scoped = RenderCtx {
                idempotency_key: key.as_deref(),
                ..*ctx
            };
            Op::Webhook {
                body: body.render(&scoped),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.render_lossy(&scoped)))
                    .collect(),
                idempotency_key: key,
            }
        }
        ActionParams::DeadLetter { reason } => Op::DeadLetter {
            reason: reason.render_lossy(ctx),
        },
        ActionParams::SalesforceUpdate {
            object,
            id,
            fields,
            idempotency_key,
        } => update(t, ctx, object, id, fields, idempotency_key.as_ref())?,
    };
    Ok(Action {
        route: route.name.clone(),
        sink: t.sink.clone(),
        record_id: ctx.record_id.map(str::to_string),
        shadow: route.shadow,
        on_failure: ctx.failure.is_some(),
        op,
    })
}

/// A BullMQ job: its id from the idempotency key, its data rendered with that key in scope.
fn enqueue(
    t: &ActionTemplate,
    ctx: &RenderCtx<'_>,
    job: &ValueTemplate,
    idempotency_key: &Template,
    job_options: &JobOptions,
) -> Result<Op, RouteError> {
    if ctx.record_id == Some(OVERFLOW_PLACEHOLDER_ID) {
        return Err(problem(
            t,
            "the GAP_OVERFLOW placeholder record id is never enqueued".into(),
        ));
    }
    let key = key(t, idempotency_key, ctx)?;
    let scoped = RenderCtx {
        idempotency_key: Some(&key),
        ..*ctx
    };
    Ok(Op::Enqueue {
        job_id: job_id_for(&key),
        data: job.render(&scoped),
        idempotency_key: key,
        options: job_options.clone(),
    })
}

/// A write-back: the record id must render to an id, the key (when there is one) completely.
fn update(
    t: &ActionTemplate,
    ctx: &RenderCtx<'_>,
    object: &str,
    id: &Template,
    fields: &[(String, ValueTemplate)],
    idempotency_key: Option<&Template>,
) -> Result<Op, RouteError> {
    let key = idempotency_key.map(|k| key(t, k, ctx)).transpose()?;
    let scoped = RenderCtx {
        idempotency_key: key.as_deref(),
        ..*ctx
    };
    let rendered = id
        .render_string(&scoped)
        .map_err(|missing| problem(t, format!("the record id `{}` has no value for {missing}", id.source())))?;
    if rendered.trim().is_empty() || rendered == OVERFLOW_PLACEHOLDER_ID {
        return Err(problem(t, format!("`{rendered}` is not a record id to update")));
    }
    Ok(Op::SalesforceUpdate {
        object: object.to_string(),
        id: rendered,
        fields: fields.iter().map(|(k, v)| (k.clone(), v.render(&scoped))).collect(),
        idempotency_key: key,
    })
}

/// An idempotency key: every part must have a value, and the whole must not be blank.
fn key(t: &ActionTemplate, template: &Template, ctx: &RenderCtx<'_>) -> Result<String, RouteError> {
    let key = template.render_string(ctx).map_err(|missing| {
        problem(
            t,
            format!("the idempotency key `{}` has no value for {missing}", template.source()),
        )
    })?;
    if key.trim().is_empty() {
        return Err(problem(t, "the idempotency key rendered empty".into()));
    }
    Ok(key)
}

/// Cache keys or patterns; one with a part that has no value is skipped (there is nothing to invalidate).
fn cache_keys(route: &Route, list: &[Template], ctx: &RenderCtx<'_>) -> Vec<String> {
    list.iter()
        .filter_map(|k| match k.render_string(ctx) {
            Ok(s) if !s.is_empty() => Some(s),
            Ok(_) | Err(_) => {
                tracing::debug!(route = %route.name, key = k.source(), "Cache key skipped: a part has no value.");
                None
            }
        })
        .collect()
}

fn problem(t: &ActionTemplate, problem: String) -> RouteError {
    RouteError::Render {
        sink: t.sink.clone(),
        at: t.at.clone(),
        problem,
    }
}

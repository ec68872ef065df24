// rules/orders.yaml written by hand as JavaScript `if`s: what the application did before switchyard, and the
// fastest JavaScript can decide the same thing. Routes in file order, `stop` per record, enrichment from each
// event's recorded `record` (as `switchyard replay` reads it). CDC mode, the shipped config's: the Platform Event
// routes are not live, so the mix's platform events decide nothing, as in `switchyard replay` without a config in
// `platform-event` mode. `node hand.js EVENTS.jsonl`.
'use strict';

const { ORDERS, VARS, changedAny, became, isBlank, containsAny, isGap, text, action, run } =
  require('./common');

// The recorded enrichment for `id`: undefined when the recording has none (the route fails, nothing runs),
// null when the record was not found.
const recordOf = (event, id) => (event.record ? event.record[id] : undefined);

function orderChange(event, totals, out) {
  const h = event.header;
  const f = event.fields || {};
  const ct = h.change_type;
  const gap = isGap(ct);
  const activating = became(h, f, 'Activation_Status__c', 'Activating')
    && (f.Status == null || VARS.trigger_statuses.includes(f.Status))
    && !containsAny(h.change_origin, VARS.ignored_change_origins);
  const commit = text(h.commit_timestamp);
  for (const id of h.record_ids) {
    if (ct === 'GAP_OVERFLOW') {
      totals.fire('overflow-needs-resync');
      out.push(action.log('overflow-needs-resync', id, 'error',
        `Order change overflow at commit ${commit}: resync the orders changed since then`, {}));
      out.push(action.deadLetter('overflow-needs-resync', id,
        `GAP_OVERFLOW on ${text(h.entity)} at commit ${commit}: resync the orders changed since then`));
      continue;
    }
    if (changedAny(h.changed_fields, VARS.customer_facing) || gap || ct === 'DELETE' || ct === 'UNDELETE') {
      const rec = recordOf(event, id);
      if (rec !== undefined) {
        totals.fire('invalidate-order-cache');
        out.push(action.invalidate('invalidate-order-cache', id,
          [`orders:detail:${id}`, `orders:account:${text(rec && rec.AccountId)}`]));
      }
    }
    if (activating) {
      const rec = recordOf(event, id);
      if (rec === undefined) continue;
      if (rec === null) {
        totals.fire('activation-order-not-found');
        out.push(action.log('activation-order-not-found', id, 'warn',
          `Order ${id} not found in Salesforce, skipping provisioning`, {}));
        continue;
      }
      if (isBlank(rec.WHMCS_Order_ID__c)) {
        totals.fire('provision-on-activating');
        const key = `activation-${id}-${commit}`;
        const correlationId = `cdc-order-${id}`;
        out.push(action.enqueue('provision-on-activating', id,
          { sfOrderId: id, accountId: text(rec.AccountId), idempotencyKey: key, correlationId }, key));
        out.push(action.log('provision-on-activating', id, 'info',
          'Order activation moved to Activating via CDC, enqueuing fulfillment', { sfOrderId: id, correlationId }));
      } else {
        out.push(action.log('provision-on-activating', id, 'info',
          'Order already has WHMCS Order ID, skipping provisioning',
          { sfOrderId: id, whmcsOrderId: text(rec.WHMCS_Order_ID__c) }));
      }
    }
    if (gap && ct !== 'GAP_DELETE') {
      const rec = recordOf(event, id);
      if (rec && rec.Activation_Status__c === 'Activating' && isBlank(rec.WHMCS_Order_ID__c)
        && (rec.Status == null || VARS.trigger_statuses.includes(rec.Status))) {
        totals.fire('gap-recheck-activation');
        const key = `activation-${id}-${commit}`;
        out.push(action.enqueue('gap-recheck-activation', id,
          { sfOrderId: id, accountId: text(rec.AccountId), idempotencyKey: key, correlationId: `cdc-gap-order-${id}` },
          key));
        out.push(action.log('gap-recheck-activation', id, 'info',
          'Gap event for an order waiting for activation, enqueuing fulfillment', { sfOrderId: id, changeType: ct }));
      }
    }
  }
}

run('hand-written JavaScript', (event, totals) => {
  const out = [];
  if (event.channel === ORDERS && event.header) orderChange(event, totals, out);
  return out;
}).catch((e) => {
  process.stderr.write(`${e.stack || e}\n`);
  process.exit(1);
});

// rules/orders.yaml as json-rules-engine rules, written as its users write them: conditions over facts with
// JSONPath, shared named conditions, custom operators for what the built-in ones cannot say, one rule per
// outcome (a route with `else` is two rules), priorities for the file order and `engine.stop()` for `stop`.
// The engine runs once per record of a change event, with the recorded enrichment as facts; each successful
// rule's event carries its actions as templates, rendered like switchyard's. CDC mode, the shipped config's: the
// Platform Event routes are not live (the mix's platform events decide nothing, as in `switchyard replay`).
// `node jre.js EVENTS.jsonl`.
'use strict';

const { Engine } = require('json-rules-engine');
const { ORDERS, VARS, changedAny, isBlank, containsAny, isGap, text, action, run } =
  require('./common');

// The custom operators and the named conditions every engine below shares.
function configure(engine) {
  engine.addOperator('changedAny', (changed, names) => Array.isArray(changed) && changedAny(changed, names));
  engine.addOperator('isGap', (changeType, expected) => isGap(changeType) === expected);
  engine.addOperator('isBlank', (value, expected) => isBlank(value) === expected);
  engine.addOperator('isNull', (value, expected) => (value === null || value === undefined) === expected);
  engine.addOperator('containsAny', (value, list) => containsAny(value, list));
  engine.setCondition('activating', ACTIVATING);
  engine.setCondition('provisionable', PROVISIONABLE);
  return engine;
}

const changeType = (operator, value) => ({ fact: 'header', path: '$.change_type', operator, value });
const recorded = { fact: 'recordFound', operator: 'equal', value: true };
const found = { fact: 'record', operator: 'isNull', value: false };

const ACTIVATING = {
  all: [
    {
      any: [
        {
          all: [
            changeType('equal', 'UPDATE'),
            { fact: 'header', path: '$.changed_fields', operator: 'changedAny', value: ['Activation_Status__c'] },
            { fact: 'fields', path: '$.Activation_Status__c', operator: 'equal', value: 'Activating' },
          ],
        },
        {
          all: [
            changeType('in', ['CREATE', 'UNDELETE']),
            { fact: 'fields', path: '$.Activation_Status__c', operator: 'equal', value: 'Activating' },
          ],
        },
      ],
    },
    {
      any: [
        { fact: 'fields', path: '$.Status', operator: 'isNull', value: true },
        { fact: 'fields', path: '$.Status', operator: 'in', value: VARS.trigger_statuses },
      ],
    },
    { not: { fact: 'header', path: '$.change_origin', operator: 'containsAny', value: VARS.ignored_change_origins } },
  ],
};

const PROVISIONABLE = {
  all: [found, { fact: 'record', path: '$.WHMCS_Order_ID__c', operator: 'isBlank', value: true }],
};

// Actions as templates: [kind, ...arguments], rendered per run.
const enqueue = (correlation, key) => [
  'enqueue',
  { sfOrderId: '{{record_id}}', accountId: '{{record.AccountId}}', idempotencyKey: '{{idempotency_key}}',
    correlationId: correlation },
  key,
];
const log = (level, message, fields = {}) => ['log', level, message, fields];
const skipped = log('info', 'Order already has WHMCS Order ID, skipping provisioning',
  { sfOrderId: '{{record_id}}', whmcsOrderId: '{{record.WHMCS_Order_ID__c}}' });

const rules = [
  {
    route: 'overflow-needs-resync', stop: true, branch: 'then',
    conditions: { all: [changeType('equal', 'GAP_OVERFLOW')] },
    actions: [
      log('error', 'Order change overflow at commit {{header.commit_timestamp}}: resync the orders changed since then'),
      ['deadLetter',
        'GAP_OVERFLOW on {{header.entity}} at commit {{header.commit_timestamp}}: resync the orders changed since then'],
    ],
  },
  {
    route: 'invalidate-order-cache', branch: 'then',
    conditions: {
      all: [
        {
          any: [
            { fact: 'header', path: '$.changed_fields', operator: 'changedAny', value: VARS.customer_facing },
            changeType('isGap', true),
            changeType('in', ['DELETE', 'UNDELETE']),
          ],
        },
        recorded,
      ],
    },
    actions: [['invalidate', ['orders:detail:{{record_id}}', 'orders:account:{{record.AccountId}}']]],
  },
  {
    route: 'activation-order-not-found', stop: true, branch: 'then',
    conditions: { all: [{ condition: 'activating' }, recorded, { fact: 'record', operator: 'isNull', value: true }] },
    actions: [log('warn', 'Order {{record_id}} not found in Salesforce, skipping provisioning')],
  },
  {
    route: 'provision-on-activating', branch: 'then', key: 'activation-{{record_id}}-{{header.commit_timestamp}}',
    conditions: { all: [{ condition: 'activating' }, recorded, { condition: 'provisionable' }] },
    actions: [
      enqueue('cdc-order-{{record_id}}', '{{idempotency_key}}'),
      log('info', 'Order activation moved to Activating via CDC, enqueuing fulfillment',
        { sfOrderId: '{{record_id}}', correlationId: 'cdc-order-{{record_id}}' }),
    ],
  },
  {
    route: 'provision-on-activating', branch: 'else',
    conditions: { all: [{ condition: 'activating' }, recorded, found, { not: { condition: 'provisionable' } }] },
    actions: [skipped],
  },
  {
    route: 'gap-recheck-activation', branch: 'then', key: 'activation-{{record_id}}-{{header.commit_timestamp}}',
    conditions: {
      all: [
        changeType('isGap', true),
        changeType('notEqual', 'GAP_DELETE'),
        recorded,
        found,
        { fact: 'record', path: '$.Activation_Status__c', operator: 'equal', value: 'Activating' },
        { fact: 'record', path: '$.WHMCS_Order_ID__c', operator: 'isBlank', value: true },
        {
          any: [
            { fact: 'record', path: '$.Status', operator: 'isNull', value: true },
            { fact: 'record', path: '$.Status', operator: 'in', value: VARS.trigger_statuses },
          ],
        },
      ],
    },
    actions: [
      enqueue('cdc-gap-order-{{record_id}}', '{{idempotency_key}}'),
      log('info', 'Gap event for an order waiting for activation, enqueuing fulfillment',
        { sfOrderId: '{{record_id}}', changeType: '{{header.change_type}}' }),
    ],
  },
];

// The order channel's engine; file order as priority.
const engine = configure(new Engine([], { allowUndefinedFacts: true }));
rules.forEach((r, i) => {
  const { conditions, ...params } = r;
  engine.addRule({ name: `${r.route}:${r.branch}`, priority: rules.length - i, conditions, event: { type: r.route, params } });
});
engine.on('success', (event) => {
  if (event.params.stop) engine.stop();
});

// `{{a.b}}` and `{{a ?? b}}` over the run's context, as switchyard's templates render them.
function render(template, ctx) {
  return template.replace(/\{\{\s*([^}]+?)\s*\}\}/g, (_, expr) => {
    for (const path of expr.split('??').map((p) => p.trim())) {
      const value = path.split('.').reduce((v, k) => (v == null ? undefined : v[k]), ctx);
      if (value !== null && value !== undefined) return text(value);
    }
    return '';
  });
}

function renderAll(value, ctx) {
  if (typeof value === 'string') return render(value, ctx);
  if (Array.isArray(value)) return value.map((v) => renderAll(v, ctx));
  return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, renderAll(v, ctx)]));
}

function actionsOf(params, ctx, out) {
  const id = ctx.record_id;
  for (const [kind, ...args] of params.actions) {
    const [a, b, c] = args.map((arg) => renderAll(arg, ctx));
    if (kind === 'enqueue') out.push(action.enqueue(params.route, id, a, b));
    else if (kind === 'log') out.push(action.log(params.route, id, a, b, c));
    else if (kind === 'invalidate') out.push(action.invalidate(params.route, id, a));
    else if (kind === 'deadLetter') out.push(action.deadLetter(params.route, id, a));
  }
}

async function decideOne(event, recordId, totals, out) {
  const rec = event.record ? event.record[recordId] : undefined;
  const facts = {
    header: event.header || {}, fields: event.fields || {}, record: rec === undefined ? null : rec,
    recordFound: rec !== undefined,
  };
  const { events } = await engine.run(facts);
  for (const { params } of events) {
    if (params.branch === 'then') totals.fire(params.route);
    const ctx = { record_id: recordId, record: facts.record, header: facts.header, event: facts.fields, event_id: event.id };
    if (params.key) ctx.idempotency_key = render(params.key, ctx);
    actionsOf(params, ctx, out);
  }
}

run('json-rules-engine 7.3.1', async (event, totals) => {
  const out = [];
  if (event.channel !== ORDERS || !event.header) return out;
  for (const id of event.header.record_ids) await decideOne(event, id, totals, out);
  return out;
}).catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});

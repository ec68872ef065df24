// What the two JavaScript runners share: the JSONL reader, the rules' vars, the predicate helpers with the
// semantics of switchyard's (src/rules/helpers.rs), the action shapes `switchyard replay` counts, and the
// totals it prints. Only the deciding differs: jre.js hands it to json-rules-engine, hand.js writes it as `if`s.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const readline = require('readline');

const ORDERS = '/data/OrderChangeEvent';

// The `vars` of rules/orders.yaml.
const VARS = {
  trigger_statuses: ['Approved', 'Reactivate'],
  customer_facing: [
    'Status', 'BillingAddress', 'ShippingAddress', 'EffectiveDate', 'EndDate', 'TotalAmount', 'Description',
    'Name', 'PoNumber', 'Type',
  ],
  ignored_change_origins: ['client=switchyard-provisioning'],
};

// `field` is `name` or nested in it (`name.*`).
function covers(name, field) {
  return field.startsWith(name) && (field.length === name.length || field[name.length] === '.');
}

function changedAny(changed, names) {
  return names.some((n) => changed.some((c) => covers(n, c)));
}

// UPDATE: the field changed and now equals the value; CREATE/UNDELETE: it equals the value.
function became(header, fields, field, value) {
  if (header.change_type === 'UPDATE') {
    return changedAny(header.changed_fields, [field]) && fields[field] === value;
  }
  return (header.change_type === 'CREATE' || header.change_type === 'UNDELETE') && fields[field] === value;
}

function isBlank(v) {
  if (v === null || v === undefined) return true;
  if (typeof v === 'string') return v.trim() === '';
  if (Array.isArray(v)) return v.length === 0;
  if (typeof v === 'object') return Object.keys(v).length === 0;
  return false;
}

function containsAny(text, list) {
  return typeof text === 'string' && list.some((n) => n !== '' && text.includes(n));
}

const isGap = (changeType) => typeof changeType === 'string' && changeType.startsWith('GAP_');

// A template value as switchyard renders it: strings as they are, null and absent as "".
const text = (v) => (v === null || v === undefined ? '' : typeof v === 'string' ? v : JSON.stringify(v));

// The actions, in the shape of `switchyard replay`'s `action_json`.
const action = {
  enqueue: (route, recordId, job, key) => ({
    sink: 'enqueue-provisioning', route, record_id: recordId, job, idempotency_key: key, job_id: key,
  }),
  invalidate: (route, recordId, keys) => ({ sink: 'invalidate-cache', route, record_id: recordId, keys, patterns: [] }),
  log: (route, recordId, level, message, fields) => ({ sink: 'log', route, record_id: recordId, message, level, fields }),
  deadLetter: (route, recordId, reason) => ({ sink: 'dead-letter', route, record_id: recordId, reason }),
};

// Totals as `switchyard replay` prints them (route: times `then` ran; sink: actions), plus a digest of every
// action of every event in order, so that the two JavaScript runners can be checked to decide exactly alike.
class Totals {
  constructor() {
    this.events = 0;
    this.malformed = 0;
    this.fired = new Map();
    this.actions = new Map();
    this.digest = crypto.createHash('sha256');
  }

  fire(route) {
    this.fired.set(route, (this.fired.get(route) || 0) + 1);
  }

  event(actions) {
    this.events += 1;
    for (const a of actions) this.actions.set(a.sink, (this.actions.get(a.sink) || 0) + 1);
    this.digest.update(JSON.stringify(actions));
    this.digest.update('\n');
  }

  print(engine) {
    const lines = [`${this.events} events replayed (${this.malformed} malformed) by ${engine}`];
    const sorted = (m) => [...m.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    for (const [route, n] of sorted(this.fired)) lines.push(`  route ${route}: fired ${n} time(s)`);
    for (const [sink, n] of sorted(this.actions)) lines.push(`  sink ${sink}: ${n} action(s)`);
    lines.push(`actions digest ${this.digest.digest('hex')}`);
    process.stdout.write(lines.join('\n') + '\n');
  }
}

// Streams the JSONL file, one parsed event at a time, through `decide` (which may be async); prints the totals.
async function run(engine, decide) {
  const file = process.argv[2];
  if (!file) {
    process.stderr.write(`usage: node ${process.argv[1]} EVENTS.jsonl\n`);
    process.exit(64);
  }
  const totals = new Totals();
  const lines = readline.createInterface({ input: fs.createReadStream(file), crlfDelay: Infinity });
  for await (const line of lines) {
    if (line.trim() === '') continue;
    let event;
    try {
      event = JSON.parse(line);
    } catch {
      totals.malformed += 1;
      continue;
    }
    totals.event(await decide(event, totals));
  }
  totals.print(engine);
}

module.exports = {
  ORDERS, VARS, changedAny, became, isBlank, containsAny, isGap, text, action, run,
};

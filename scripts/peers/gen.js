// The order mix of the benches (benches/common/mod.rs, `event_mix`) as JSONL on stdout: per 20 events 3
// approvals, 1 bulk approval (3 records), 1 re-approval of a provisioned order, 1 approval of a missing order,
// 5 cache-relevant edits, 6 internal-only edits, 2 platform events, 1 gap event (every other one re-checks an
// order waiting for activation), each with the enrichment the rules read recorded in `record`.
// `node gen.js N [RUN]`.
'use strict';

const MIX = [
  'approval', 'cache', 'internal', 'approval', 'cache', 'internal', 'platform', 'provisioned', 'internal', 'cache',
  'approval', 'internal', 'gap', 'missing', 'cache', 'internal', 'bulk', 'cache', 'platform', 'internal',
];

const pad = (n, width) => String(n).padStart(width, '0');
const orderId = (run, i, k) => `801${pad(run % 10_000_000, 7)}${pad(i % 100_000, 5)}${k}AA`;

function event(kind, i, run) {
  const ts = 1_764_230_400_000 + run * 1_000_000 + i;
  const tx = `tx-${run}-${i}`;
  const id = orderId(run, i, 0);
  const account = `001${pad(run % 10_000_000, 7)}${pad(i % 100_000, 5)}0AA`;
  const replayId = (i + 1).toString(16).padStart(16, '0');
  const order = (whmcs) => ({ [id]: { WHMCS_Order_ID__c: whmcs, AccountId: account } });
  let changeType = 'UPDATE';
  let ids = [id];
  let changed = [];
  let nulled = [];
  let fields = {};
  let record = {};
  switch (kind) {
    case 'approval':
    case 'provisioned':
    case 'missing':
      changed = ['Status', 'Activation_Status__c', 'Activation_Error_Code__c', 'Activation_Error_Message__c',
        'LastModifiedDate'];
      nulled = ['Activation_Error_Code__c', 'Activation_Error_Message__c'];
      fields = { Status: i % 7 === 3 ? 'Reactivate' : 'Approved', Activation_Status__c: 'Activating',
        Activation_Error_Code__c: null, Activation_Error_Message__c: null, LastModifiedDate: ts };
      record = kind === 'approval' ? order(null) : kind === 'provisioned' ? order(`WH-${i}`) : { [id]: null };
      break;
    case 'bulk':
      ids = [0, 1, 2].map((k) => orderId(run, i, k));
      changed = ['Activation_Status__c', 'LastModifiedDate'];
      fields = { Activation_Status__c: 'Activating', LastModifiedDate: ts };
      record = Object.fromEntries(ids.map((r) => [r, { WHMCS_Order_ID__c: null, AccountId: account }]));
      break;
    case 'cache':
      [changed, fields] = [
        [['BillingAddress.City', 'BillingAddress.PostalCode', 'LastModifiedDate'],
          { BillingAddress: { City: 'Osaka', PostalCode: '530-0001' }, LastModifiedDate: ts }],
        [['Status', 'LastModifiedDate'], { Status: 'Cancelled', LastModifiedDate: ts }],
        [['Description', 'LastModifiedDate'], { Description: `Gift wrap, please (${i})`, LastModifiedDate: ts }],
      ][i % 3];
      record = { [id]: { AccountId: account } };
      break;
    case 'internal':
      [changed, fields] = i % 2 === 0
        ? [['Activation_Status__c', 'WHMCS_Order_ID__c', 'LastModifiedDate'],
          { Activation_Status__c: 'Activated', WHMCS_Order_ID__c: `WH-${i}`, LastModifiedDate: ts }]
        : [['Activation_Status__c', 'Activation_Error_Code__c', 'LastModifiedDate'],
          { Activation_Status__c: 'Failed', Activation_Error_Code__c: 'E42', LastModifiedDate: ts }];
      break;
    case 'gap': {
      changeType = 'GAP_UPDATE';
      const waiting = Math.floor(i / MIX.length) % 2 === 0;
      record = {
        [id]: waiting
          ? { Activation_Status__c: 'Activating', Status: 'Approved', WHMCS_Order_ID__c: null, AccountId: account }
          : { Activation_Status__c: 'Activated', Status: 'Activated', WHMCS_Order_ID__c: `WH-${i}`, AccountId: account },
      };
      break;
    }
    case 'platform': {
      const uuid = `5b1f3c2e-8d7a-4f0e-${(run % 0xffff).toString(16).padStart(4, '0')}-${i.toString(16).padStart(12, '0')}`;
      return {
        id: uuid, channel: '/event/Order_Fulfilment_Requested__e', kind: 'platform', replay_id: replayId,
        fields: { CreatedDate: ts, CreatedById: '005xx0000000001AAA', Order_Id__c: id,
          Idempotency_Key__c: `ofr-${id}-${run}`, Correlation_Id__c: `corr-${uuid}` },
        record: order(null),
      };
    }
    default:
      throw new Error(`unknown kind ${kind}`);
  }
  return {
    id: `${tx}:1`, channel: '/data/OrderChangeEvent', kind: 'change', replay_id: replayId,
    header: { entity: 'Order', change_type: changeType, record_ids: ids, changed_fields: changed, nulled_fields: nulled,
      diff_fields: [], change_origin: 'com/salesforce/api/rest/62.0', transaction_key: tx, sequence_number: 1,
      commit_timestamp: ts, commit_number: i, commit_user: '005xx0000000001AAA' },
    fields, record,
  };
}

const n = Number(process.argv[2] || 100_000);
const run = Number(process.argv[3] || 1);
if (!Number.isInteger(n) || n < 1 || !Number.isInteger(run) || run < 1) {
  process.stderr.write('usage: node gen.js N [RUN]  (N events, RUN a positive integer making the ids unique)\n');
  process.exit(64);
}
const out = [];
for (let i = 0; i < n; i += 1) {
  out.push(JSON.stringify(event(MIX[i % MIX.length], i, run)));
  if (out.length === 10_000 || i === n - 1) {
    process.stdout.write(out.join('\n') + '\n');
    out.length = 0;
  }
}

// A stock BullMQ Worker on switchyard's provisioning queue, as an application would run it.
//
// Environment: REDIS_URL, PREFIX (the BullMQ key prefix), QUEUE (default `provisioning`), EXPECT (how many
// jobs to complete before stopping). SENTINELS (host:port,...) with MASTER connects through Redis Sentinel instead,
// CLUSTER (host:port,...) to a Redis Cluster (with a hash-tagged PREFIX such as `{bull}`), as ioredis documents. Prints one JSON line: every job it processed (id, name, data, the
// options BullMQ stored with it) and the queue's job counts once it stopped.
// Exits 0 after EXPECT completions; exits 2 if that does not happen within GIVE_UP_MS (so a broken run
// ends instead of hanging; the Rust test then reports what was seen).
'use strict';

const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');

const url = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const prefix = process.env.PREFIX || 'bull';
const queueName = process.env.QUEUE || 'provisioning';
const expect = Number(process.env.EXPECT || '0');
const giveUpMs = Number(process.env.GIVE_UP_MS || '60000');

const nodes = (list) => list.split(',').map((node) => {
  const at = node.lastIndexOf(':');
  return { host: node.slice(0, at), port: Number(node.slice(at + 1)) };
});
// BullMQ workers need `maxRetriesPerRequest: null` (their blocking commands must not be retried away).
let connection;
if (process.env.SENTINELS) {
  connection = new IORedis({ sentinels: nodes(process.env.SENTINELS), name: process.env.MASTER || 'mymaster', maxRetriesPerRequest: null });
} else if (process.env.CLUSTER) {
  connection = new IORedis.Cluster(nodes(process.env.CLUSTER), { redisOptions: { maxRetriesPerRequest: null } });
} else {
  connection = new IORedis(url, { maxRetriesPerRequest: null });
}
const processed = [];
let completed = 0;
let finishing = false;

const worker = new Worker(
  queueName,
  async (job) => {
    processed.push({ id: job.id, name: job.name, data: job.data, opts: job.opts, attemptsMade: job.attemptsMade });
    return { provisioned: job.data.sfOrderId };
  },
  { connection, prefix, concurrency: Number(process.env.CONCURRENCY || '1') },
);

async function finish(code) {
  if (finishing) return;
  finishing = true;
  await worker.close();
  const queue = new Queue(queueName, { connection, prefix });
  const counts = await queue.getJobCounts('waiting', 'active', 'delayed', 'prioritized', 'completed', 'failed');
  const results = {};
  for (const job of processed) {
    const stored = await queue.getJob(job.id);
    results[job.id] = stored ? { returnvalue: stored.returnvalue, finishedOn: stored.finishedOn ?? null } : null;
  }
  await queue.close();
  await connection.quit();
  // A pipe takes large writes in pieces: exit only once the whole report is out.
  process.stdout.write(JSON.stringify({ processed, counts, results }) + '\n', () => process.exit(code));
}

worker.on('completed', () => {
  completed += 1;
  if (completed >= expect) finish(0);
});
worker.on('failed', (job, err) => {
  process.stderr.write(`job ${job && job.id} failed: ${err && err.message}\n`);
});
worker.on('error', (err) => process.stderr.write(`worker error: ${err && err.message}\n`));
setTimeout(() => finish(2), giveUpMs).unref();

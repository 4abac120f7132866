'use strict';
// An external worker: long-poll fetch, do the work, ack naming the task (taskId, epoch, hasToken).
//
//   QB_AMQP_URL   amqp://worker-a:worker-a@127.0.0.1:5672/  (the user is the owner of its tasks)
//   QB_AMQP_HOSTS (none)           a RabbitMQ cluster's nodes, host[:port] comma separated, used with
//                 QB_AMQP_URL's user and vhost: the next node when one is lost (BRIDGE_AMQP_HOSTS)
//   QB_EXCHANGE   queue-bridge     (BRIDGE_EXCHANGE)
//   QB_SERVICE    demo             serviceId
//   QB_WORKER_ID  <hostname>-<pid> unique per running worker
//   QB_WAIT_MS    10000            long-poll: how long one fetch waits for a task (at most 30000)
//   QB_TTR_MS     30000            timeToRecover: the lease; unacked, the task comes back after it
//   QB_MAX_TASKS  0                stop after this many tasks (0: until SIGTERM/SIGINT)
//   QB_IDLE_EXIT  0                stop after this many empty fetches in a row (0: never)
//
// The work: {"upper": value.text upper-cased, "n": value.n}; a value with "fail": true is acked
// with a business error instead ({"message": ...}): it reaches the engine as an error result.
// Prints JSON lines: {"event": "task", ...}, {"event": "acked", "taskId", "completed"}.

const os = require('node:os');
const { BridgeClient, BridgeError, emit, env, hostsEnv, intEnv, run, sleep } = require('./bridge');

let stopping = false;
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    stopping = true; // finish the task in hand, then stop
  });
}

function work(value) {
  if (value && value.fail) return { error: { message: `task ${value.n} failed on purpose` } };
  const text = value && typeof value.text === 'string' ? value.text : JSON.stringify(value);
  return { result: { upper: text.toUpperCase(), n: value ? value.n : null } };
}

async function main() {
  const url = env('QB_AMQP_URL', 'amqp://worker-a:worker-a@127.0.0.1:5672/');
  const exchange = env('QB_EXCHANGE', 'queue-bridge');
  const serviceId = env('QB_SERVICE', 'demo');
  const workerId = env('QB_WORKER_ID', `${os.hostname()}-${process.pid}`);
  const waitMs = intEnv('QB_WAIT_MS', 10_000);
  const timeToRecover = intEnv('QB_TTR_MS', 30_000);
  const maxTasks = intEnv('QB_MAX_TASKS', 0);
  const idleExit = intEnv('QB_IDLE_EXIT', 0);

  const client = await BridgeClient.open({ url, exchange, hosts: hostsEnv() });
  let done = 0;
  let idle = 0;
  // `fresh` (1.3): we know we hold no task (our last fetch answered none, or our last ack was
  // answered). Never after a request that failed: then we may still hold one.
  let fresh = false;
  try {
    while (!stopping && (maxTasks === 0 || done < maxTasks)) {
      const fetch = { serviceId, workerId, timeToRecover, waitMs };
      if (fresh) fetch.fresh = true;
      let reply;
      try {
        // The reply may take waitMs: wait longer than that (x-deadline follows the timeout).
        reply = await client.request('fetch', fetch, { timeoutMs: waitMs + 10_000 });
      } catch (err) {
        fresh = false;
        if (err instanceof BridgeError && err.code !== 'unavailable' && err.code !== 'integrity_error') throw err;
        emit('fetch_failed', { code: err.code ?? null, message: String(err.message) });
        await sleep(1000);
        continue;
      }
      // A task's value may itself be null: test for `task`, not for `result`.
      if (reply.body.task === undefined) {
        fresh = true;
        idle += 1;
        if (idleExit > 0 && idle >= idleExit) break;
        continue;
      }
      idle = 0;
      const { task, result: value } = reply.body;
      emit('task', { taskId: task.id, epoch: task.epoch, deliveries: task.deliveries, hasToken: task.hasToken, value });
      const outcome = work(value);
      // Name the task and its lease: this ack completes exactly that, or answers false.
      const ack = { serviceId, workerId, taskId: task.id, epoch: task.epoch, hasToken: task.hasToken, ...outcome };
      try {
        const acked = await client.request('ack', ack);
        emit('acked', { taskId: task.id, completed: acked.body.result });
        fresh = true; // answered, true or false: we hold nothing now
      } catch (err) {
        // Not answered (or unavailable): the lease runs out and the task comes back; the ack
        // may be retried as is (it names its task, so it can never complete another one).
        fresh = false;
        emit('ack_failed', { taskId: task.id, code: err.code ?? null, message: String(err.message) });
        if (err instanceof BridgeError && err.code !== 'unavailable') throw err;
        continue;
      }
      done += 1;
    }
    return 0;
  } catch (err) {
    emit('error', { code: err.code ?? null, message: err instanceof BridgeError ? err.detail : String(err) });
    return 1;
  } finally {
    await client.close();
  }
}

run(main);

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
//   QB_POLL_MS    200              the pause after an empty reply when not long-polling (QB_WAIT_MS=0),
//                                  and the first pause after a failed fetch (doubling per failure in
//                                  a row, up to 5 s, full jitter)
//   QB_TTR_MS     30000            timeToRecover: the lease; unacked, the task comes back after it
//   QB_MAX_TASKS  0                stop after this many tasks (0: until SIGTERM/SIGINT)
//   QB_IDLE_EXIT  0                stop after this many empty fetches in a row (0: never)
//   QB_WORK_MS    0                the demo work's duration (stands for your handler's time)
//   QB_STOP_TIMEOUT_MS 20000       after SIGTERM/SIGINT, how long the task in hand may still take:
//                                  then it is given back (`fail`, retryInMs 0) to come again at once
//   QB_CONNECT_TIMEOUT_MS 5000     how long connecting to one RabbitMQ node may take
//
// The work: {"upper": value.text upper-cased, "n": value.n}; a value with "fail": true is acked
// with a business error instead ({"message": ...}): it reaches the engine as an error result.
// Prints JSON lines: {"event": "task", ...}, {"event": "acked", "taskId", "completed"},
// {"event": "fetch_failed", "code", "message", "pauseMs"}, {"event": "ack_failed", ...},
// {"event": "given_back", "taskId", "reason", "answered"}, {"event": "stopping", "signal"}.
//
// What ends the loop, as the Python client's Worker.run:
// * Only an answer that says this worker itself is wrong (bad_request, payload_too_large,
//   unauthorized, unknown_owner on a fetch): no retry fixes it, exit 1 with the error.
// * Anything else about a fetch (no reply, the connection lost, RabbitMQ out of reach,
//   `unavailable`, `internal`, a code this script does not know) pauses and fetches again, a
//   little longer each time; `integrity_error` (a task the bridge could not open and
//   dead-lettered) fetches again at once.
// * An ack without an answer (or `unavailable`) is sent again, 3 times at most (it names its task,
//   so it can never complete another one); then the next fetch, not `fresh`, hands the task back
//   if the ack never applied. An ack the bridge refuses (payload_too_large: the result is larger
//   than BRIDGE_MAX_VALUE_BYTES; bad_request; ...) cannot succeed by being sent again: the task is
//   given back with `fail` instead of being left leased to us until its lease runs out.
// * SIGTERM/SIGINT: a long-poll under way is given up at once by closing the connection (the
//   bridge checks a waiting fetch's reply-to before it claims a task for it: gone, it claims
//   nothing); the task in hand is finished and acked, or given back after QB_STOP_TIMEOUT_MS.
//   A second signal exits at once (a task in hand returns when its lease runs out).

const os = require('node:os');
const { BridgeClient, backoffMs, emit, env, hostsEnv, intEnv, run, sleep } = require('./bridge');

// Fetch answers that say the worker is misconfigured: no retry fixes them (rpc.py MISCONFIGURED).
const MISCONFIGURED = new Set(['bad_request', 'payload_too_large', 'unauthorized', 'unknown_owner']);
// Ack failures after which the ack may have applied or may apply when sent again.
const UNANSWERED = new Set(['timeout', 'connection_lost', 'unavailable']);
const ACK_ATTEMPTS = 3;
const SIGNAL_EXIT = { SIGINT: 130, SIGTERM: 143 };
const CUT = Symbol('cut');

let client = null;
let phase = 'idle'; // 'fetching' while a fetch waits: a signal then closes the connection
let stopping = false;
let cutHandler = false; // a handler still ran when we gave its task back
let signalled = () => {};
const stopped = new Promise((resolve) => {
  signalled = resolve;
});
let wake = null; // ends the pause under way (a signal)

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    if (stopping) {
      // The second signal: the operator means it. A task in hand returns when its lease ends.
      emit('killed', { signal });
      process.exit(SIGNAL_EXIT[signal]);
    }
    stopping = true;
    emit('stopping', { signal, phase });
    signalled();
    if (wake !== null) wake();
    // A long-poll can wait 30 s: give it up now. With its channel gone, its reply-to is gone, and
    // the bridge, which checks that before it claims a task for a waiting fetch, claims nothing.
    if (phase === 'fetching' && client !== null) client.close();
  });
}

/** A pause that a signal cuts short. */
function pause(ms) {
  if (stopping || ms <= 0) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      wake = null;
      resolve();
    };
    const timer = setTimeout(done, ms);
    wake = done;
  });
}

/** The demo work; replace it with yours (it may be async, and may throw: the task is given back). */
async function work(value, workMs) {
  if (workMs > 0) await sleep(workMs);
  if (value && value.fail) return { error: { message: `task ${value.n} failed on purpose` } };
  const text = value && typeof value.text === 'string' ? value.text : JSON.stringify(value);
  return { result: { upper: text.toUpperCase(), n: value ? value.n : null } };
}

/** The work, or CUT when a signal came and it still ran stopTimeoutMs later. */
async function handle(value, workMs, stopTimeoutMs) {
  let timer = null;
  const cut = stopped.then(
    () =>
      new Promise((resolve) => {
        timer = setTimeout(() => resolve(CUT), stopTimeoutMs);
      }),
  );
  try {
    return await Promise.race([work(value, workMs), cut]);
  } finally {
    if (timer !== null) clearTimeout(timer);
  }
}

async function main() {
  const url = env('QB_AMQP_URL', 'amqp://worker-a:worker-a@127.0.0.1:5672/');
  const exchange = env('QB_EXCHANGE', 'queue-bridge');
  const serviceId = env('QB_SERVICE', 'demo');
  const workerId = env('QB_WORKER_ID', `${os.hostname()}-${process.pid}`);
  const waitMs = intEnv('QB_WAIT_MS', 10_000);
  const pollMs = intEnv('QB_POLL_MS', 200);
  const timeToRecover = intEnv('QB_TTR_MS', 30_000);
  const maxTasks = intEnv('QB_MAX_TASKS', 0);
  const idleExit = intEnv('QB_IDLE_EXIT', 0);
  const workMs = intEnv('QB_WORK_MS', 0);
  const stopTimeoutMs = intEnv('QB_STOP_TIMEOUT_MS', 20_000);
  const connectTimeoutMs = intEnv('QB_CONNECT_TIMEOUT_MS', 5_000);

  // Not connected yet: the first fetch connects, and RabbitMQ out of reach then is retried as any
  // failed fetch is (a worker may start before its broker).
  client = new BridgeClient({ url, exchange, hosts: hostsEnv(), connectTimeoutMs });

  /**
   * Give a task back (`fail`): it comes again after retryInMs (absent: the bridge's backoff).
   * What the bridge answered (true, or false: the task was no longer ours), null if not answered.
   */
  async function giveBack(task, reason, message, retryInMs) {
    const named = { serviceId, workerId, taskId: task.id, epoch: task.epoch };
    if (retryInMs !== undefined) named.retryInMs = retryInMs;
    // The error as it is, then its type alone if the bridge refuses that (too large, say).
    for (const error of [{ type: reason, message: String(message).slice(0, 4096) }, { type: reason }]) {
      try {
        const reply = await client.request('fail', { ...named, error });
        emit('given_back', { taskId: task.id, reason, answered: reply.body.result });
        return reply.body.result;
      } catch (err) {
        if (UNANSWERED.has(err.code) || err.code === 'closed') break; // it returns when its lease ends
      }
    }
    emit('given_back', { taskId: task.id, reason, answered: null }); // not given back: its lease ends it
    return null;
  }

  /** Ack (sent again after no answer); true/false as answered, null when not applied. */
  async function ackTask(task, outcome) {
    // Name the task and its lease: this ack completes exactly that, or answers false.
    const ack = { serviceId, workerId, taskId: task.id, epoch: task.epoch, hasToken: task.hasToken, ...outcome };
    for (let attempt = 1; attempt <= ACK_ATTEMPTS; attempt++) {
      try {
        const acked = await client.request('ack', ack);
        emit('acked', { taskId: task.id, completed: acked.body.result });
        return acked.body.result;
      } catch (err) {
        emit('ack_failed', { taskId: task.id, attempt, code: err.code ?? null, message: String(err.message) });
        if (!UNANSWERED.has(err.code)) {
          // Refused (payload_too_large, bad_request, internal, ...): the result was not applied,
          // and sending it again cannot help. Give the task back rather than leave it leased.
          await giveBack(task, 'ResultRefused', err.message);
          return null;
        }
        if (attempt < ACK_ATTEMPTS) await sleep(backoffMs(attempt, pollMs));
      }
    }
    return null; // the next fetch (not `fresh`) hands the task back if the ack never applied
  }

  let done = 0;
  let idle = 0;
  let failed = 0; // fetches in a row that failed: their pause grows
  // `fresh` (1.3): we know we hold no task (our last fetch answered none, or our last ack was
  // answered). Never after a request that failed: then we may still hold one.
  let fresh = false;
  try {
    while (!stopping && (maxTasks === 0 || done < maxTasks)) {
      const fetch = { serviceId, workerId, timeToRecover, waitMs };
      if (fresh) fetch.fresh = true;
      fresh = false; // until this fetch is answered
      let reply;
      phase = 'fetching';
      try {
        // The reply may take waitMs: wait longer than that (x-deadline follows the timeout).
        reply = await client.request('fetch', fetch, { timeoutMs: waitMs + 10_000 });
      } catch (err) {
        if (stopping) break; // the signal closed the connection under the long-poll
        if (MISCONFIGURED.has(err.code)) throw err; // this worker cannot be served: say so and stop
        if (err.code === 'integrity_error') {
          // The bridge could not open a task (tampered, or its key gone), dead-lettered it and
          // cleared our pointer: the next fetch moves on at once.
          emit('fetch_failed', { code: err.code, message: String(err.message), pauseMs: 0 });
          failed = 0;
          continue;
        }
        // No reply, the connection lost, RabbitMQ out of reach, unavailable, internal, a code we
        // do not know: none is this worker's fault, so pause (longer each time) and fetch again.
        failed += 1;
        const pauseMs = backoffMs(failed, pollMs);
        emit('fetch_failed', { code: err.code ?? null, message: String(err.message), pauseMs });
        await pause(pauseMs);
        continue;
      } finally {
        phase = 'idle';
      }
      failed = 0;
      // A task's value may itself be null: test for `task`, not for `result`.
      if (reply.body.task === undefined) {
        fresh = true;
        idle += 1;
        if (idleExit > 0 && idle >= idleExit) break;
        if (waitMs === 0) await pause(pollMs); // not long-polling: do not ask again at once
        continue;
      }
      idle = 0;
      const { task, result: value } = reply.body;
      emit('task', { taskId: task.id, epoch: task.epoch, deliveries: task.deliveries, hasToken: task.hasToken, value });
      phase = 'working';
      let outcome;
      try {
        outcome = await handle(value, workMs, stopTimeoutMs);
      } catch (err) {
        // The work failed: give the task back, to come again after the bridge's backoff.
        fresh = (await giveBack(task, err.name || 'Error', err.message)) !== null;
        done += 1;
        continue;
      } finally {
        phase = 'idle';
      }
      if (outcome === CUT) {
        // Told to stop, and the work did not end in time: give the task back to come again at
        // once (another worker takes it), instead of leaving it leased to a stopped worker.
        cutHandler = true;
        await giveBack(task, 'StopTimeout', 'cancelled at the worker stop', 0);
        break;
      }
      phase = 'acking';
      const completed = await ackTask(task, outcome);
      phase = 'idle';
      fresh = completed !== null; // answered, true or false: we hold nothing now
      done += 1;
    }
    return 0;
  } catch (err) {
    emit('error', { code: err.code ?? null, message: err.detail ?? String(err.message) });
    return 1;
  } finally {
    await client.close();
  }
}

run(async () => {
  const rc = await main();
  // A handler given up on may still hold timers or sockets: do not wait for them.
  if (cutHandler) setImmediate(() => process.exit(rc));
  return rc;
});

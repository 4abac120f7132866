'use strict';
// The workflow-engine side: add QB_COUNT tasks for an owner, each with a token, as a trusted user.
//
//   QB_AMQP_URL   amqp://engine:engine@127.0.0.1:5672/  (a user in the bridge's BRIDGE_TRUSTED_USERS)
//   QB_AMQP_HOSTS (none)           a RabbitMQ cluster's nodes, host[:port] comma separated, used with
//                 QB_AMQP_URL's user and vhost: the next node when one is lost (BRIDGE_AMQP_HOSTS)
//   QB_EXCHANGE   queue-bridge                          (BRIDGE_EXCHANGE)
//   QB_OWNER      worker-a     the owner the tasks are for: sent as the `x-owner` header
//   QB_SERVICE    demo         serviceId
//   QB_COUNT      5            tasks to add
//   QB_PROCESS_ID (random)     goes into each token, so results.js can tell this run's results
//   QB_FAIL_EVERY 0            every Nth task asks the worker for a business error (0: none)
//   QB_TIMEOUT_MS 10000        reply timeout of one add (then it is retried, same message-id)
//   QB_RETRY_FOR_MS 120000     how long one add is retried (no reply, `unavailable`, the connection
//                 lost or RabbitMQ out of reach) before the engine gives up (exit 1)
//   QB_RETRY_BASE_MS 200       first retry pause (at least 100); doubles per retry up to 5 s, full jitter
//   QB_CONNECT_TIMEOUT_MS 5000 how long connecting to one RabbitMQ node may take, and how long
//                 closing the connection may (then its socket is destroyed)
//
// Prints one JSON line per task: {"event": "added", "n", "taskId", "messageId", "token"}, and
// {"event": "retry", "messageId", "attempt", "code", "message", "pauseMs"} before each retry.
// Exit 0 when every add was answered, 1 otherwise.
//
// Every add carries a message-id, `<processId>:<n>`, the same on each retry: the bridge stores the
// add once per (owner, serviceId, message-id), so a retry of an add that ran after all (its reply
// lost with the connection) answers the task it stored, never a second one.

const crypto = require('node:crypto');
const { BACKOFF_BASE_MS, BridgeClient, BridgeError, backoffMs, emit, env, hostsEnv, intEnv, run, sleep } = require('./bridge');

// The codes worth sending the same add again for: no reply in time, the bridge's store
// unavailable, the connection lost under the add or RabbitMQ out of reach (a broker restart, a
// failover). The others (bad_request, unauthorized, unknown_owner, payload_too_large, ...) answer
// the same however often they are asked.
const RETRYABLE = new Set(['unavailable', 'timeout', 'connection_lost']);

async function addOne(client, { owner, service, value, token, messageId, timeoutMs, retryForMs, retryBaseMs }) {
  const started = performance.now();
  for (let attempt = 1; ; attempt++) {
    try {
      // `x-owner` is an application header; user-id, reply-to, correlation-id and message-id are
      // AMQP properties (set by BridgeClient.request). The same message-id makes a retry safe.
      const reply = await client.request(
        'add',
        { serviceId: service, value, token },
        { headers: { 'x-owner': owner }, messageId, timeoutMs },
      );
      return reply.body.task.id;
    } catch (err) {
      const pauseMs = backoffMs(attempt, retryBaseMs);
      if (!RETRYABLE.has(err.code) || performance.now() - started + pauseMs > retryForMs) throw err;
      emit('retry', { messageId, attempt, code: err.code, message: String(err.message), pauseMs });
      await sleep(pauseMs);
    }
  }
}

async function main() {
  const url = env('QB_AMQP_URL', 'amqp://engine:engine@127.0.0.1:5672/');
  const exchange = env('QB_EXCHANGE', 'queue-bridge');
  const owner = env('QB_OWNER', 'worker-a');
  const service = env('QB_SERVICE', 'demo');
  const count = intEnv('QB_COUNT', 5);
  const processId = env('QB_PROCESS_ID', crypto.randomUUID());
  const failEvery = intEnv('QB_FAIL_EVERY', 0);
  const timeoutMs = intEnv('QB_TIMEOUT_MS', 10_000);
  const retryForMs = intEnv('QB_RETRY_FOR_MS', 120_000);
  // Never below BACKOFF_BASE_MS: a base of 0 retried as fast as the loop turned (as worker.js's pauses).
  const retryBaseMs = Math.max(intEnv('QB_RETRY_BASE_MS', 200), BACKOFF_BASE_MS);
  const connectTimeoutMs = intEnv('QB_CONNECT_TIMEOUT_MS', 5_000);

  // Not connected yet: the first add connects, and a broker out of reach then is retried as any
  // lost connection is.
  const client = new BridgeClient({ url, exchange, hosts: hostsEnv(), connectTimeoutMs });
  try {
    for (let n = 0; n < count; n++) {
      const fail = failEvery > 0 && n % failEvery === failEvery - 1;
      const value = { n, text: `task ${n} of ${processId}`, fail };
      const token = { processId, n }; // never shown to workers; comes back in the result
      const messageId = `${processId}:${n}`;
      const taskId = await addOne(client, {
        owner,
        service,
        value,
        token,
        messageId,
        timeoutMs,
        retryForMs,
        retryBaseMs,
      });
      emit('added', { n, taskId, messageId, token });
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

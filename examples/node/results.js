'use strict';
// The engine's results consumer: read result messages, keep those of one owner and service.
//
//   QB_AMQP_URL          amqp://engine:engine@127.0.0.1:5672/
//   QB_AMQP_HOSTS        (none)     a RabbitMQ cluster's nodes, host[:port] comma separated, used with
//                                   QB_AMQP_URL's user and vhost: the next node when one is lost
//                                   (BRIDGE_AMQP_HOSTS), as bridge.js does
//   QB_RESULTS_QUEUE     queue-bridge.results   (BRIDGE_RESULTS_QUEUE) the queue to consume
//   QB_BRIDGE_USER       queue-bridge  the bridge's broker user (BRIDGE_AMQP_URL's): a result whose
//                                   broker-validated `user-id` is another user's is not the bridge's
//                                   (anyone allowed to publish to the results exchange could forge one,
//                                   naming any owner and token; docs/security.md). It stops the script
//                                   (exit 1, "not_from_bridge"), the message left in the queue: either
//                                   this setting is wrong (dropped, every real result would be lost
//                                   from the shared queue) or someone publishes results who must not.
//                                   "" = keep whoever published it
//   QB_OWNER             worker-a   keep results whose `x-owner` header is this owner ("" = any)
//   QB_SERVICE           demo       keep results whose routing key (= serviceId) is this ("" = any)
//   QB_EXPECT            0          exit 0 after this many distinct results kept (0: run until stopped)
//   QB_TIMEOUT_MS        60000      exit 1 if they have not all come by then (with QB_EXPECT)
//   QB_BIND              (unset)    instead of QB_RESULTS_QUEUE, declare an exclusive server-named
//                                   queue bound to QB_RESULTS_EXCHANGE with this routing-key pattern
//                                   (e.g. the serviceId, or `billing.#`). Needs a broker user that may
//                                   declare queues and read the exchange: the shipped engine
//                                   permissions do not allow it.
//   QB_RESULTS_EXCHANGE  queue-bridge.results   (BRIDGE_RESULTS_EXCHANGE), with QB_BIND
//   QB_DEDUP_SIZE        100000     message-ids remembered to drop duplicates (the most recent ones:
//                                   a copy comes soon after the first, so memory stays bounded)
//   QB_RETRY_BASE_MS     200        first pause before reconnecting (at least 100); doubles up to 5 s, full jitter;
//                                   and the pause before a result whose handling failed is requeued
//   QB_CONNECT_TIMEOUT_MS 5000      how long connecting to one RabbitMQ node may take
//
// Results are at least once: de-duplicated on the `message-id` property (of the last QB_DEDUP_SIZE
// results handled: an id is remembered once its result was handled, then acked). A result whose
// handling throws is reported ("handling_failed") and requeued QB_RETRY_BASE_MS later, to come
// again (to this consumer or another). A lost connection (a broker restart, a failover) is
// reconnected, with backoff, starting at the node after the one lost (each node of QB_AMQP_HOSTS
// tried in turn): what was not acked comes again, and is de-duplicated. With QB_BIND the queue is exclusive, so results
// published while the connection was down are not in the new one. A refusal (403: the user may not
// read the queue or bind; 404: no such queue or exchange) ends the script (exit 1); a classic queue
// whose home node is down (404 too) is waited for, reconnecting with backoff. A message whose
// body is not a JSON object is acked and reported ("bad_result"): requeued, it would come back for
// ever. The results queue is
// shared by every owner and service: results this consumer does not keep are acked and reported
// as "skipped" (run one consumer per results queue, or bind a queue of your own).
// Prints JSON lines: {"event": "ready", "queue"} once consuming (again after each reconnection),
// then {"event": "result", "taskId", "serviceId", "owner", "token", "result" | "error",
// "completedAt", "messageId", "type"}, {"event": "skipped", ...}, {"event": "bad_result",
// "messageId", "message"}, {"event": "handling_failed", "messageId", "serviceId", "message"} and
// {"event": "reconnecting", "message", "pauseMs"}.

const amqp = require('amqplib');
const { BACKOFF_BASE_MS, backoffMs, closeBounded, emit, env, hostsEnv, intEnv, nodeUrls, run } = require('./bridge');

function text(value) {
  // Header values of the AMQP table: strings (longstr) may reach us as Buffers.
  return Buffer.isBuffer(value) ? value.toString('utf8') : value;
}

/** The message-ids of the last `limit` results: a set that forgets the oldest (least recently seen). */
class RecentIds {
  constructor(limit) {
    this.limit = Math.max(1, limit);
    this.ids = new Map(); // insertion order: the oldest first
  }

  /** Whether `id` was seen (it then counts as seen now). */
  has(id) {
    if (!this.ids.delete(id)) return false;
    this.ids.set(id, true);
    return true;
  }

  /** Remember `id` as seen now (forgetting the oldest past the limit). */
  add(id) {
    this.ids.delete(id);
    this.ids.set(id, true);
    while (this.ids.size > this.limit) this.ids.delete(this.ids.keys().next().value);
  }
}

// Channel errors that say this consumer is misconfigured (no retry fixes them): access refused,
// not found (queue or exchange), precondition failed.
const REFUSED = new Set([403, 404, 406]);

/** A 404 that is an outage, not a misconfiguration: a classic durable queue whose home node is down
 * (RabbitMQ: "home node ... of durable queue ... is down or inaccessible"). The queue comes back
 * with its node: wait for it as for a lost connection (ended, no results were read until someone
 * restarted the consumer). */
function homeNodeDown(err) {
  return err.code === 404 && /down or inaccessible/.test(String(err.message ?? ''));
}

async function main() {
  const url = env('QB_AMQP_URL', 'amqp://engine:engine@127.0.0.1:5672/');
  // Not env(): an empty value means "any" here, not "the default".
  const owner = process.env.QB_OWNER ?? 'worker-a';
  const bridgeUser = process.env.QB_BRIDGE_USER ?? 'queue-bridge';
  const service = process.env.QB_SERVICE ?? 'demo';
  const expect = intEnv('QB_EXPECT', 0);
  const timeoutMs = intEnv('QB_TIMEOUT_MS', 60_000);
  const pattern = env('QB_BIND', '');
  const dedupSize = intEnv('QB_DEDUP_SIZE', 100_000);
  // Never below BACKOFF_BASE_MS: a base of 0 reconnected (and requeued) as fast as the loop turned.
  const retryBaseMs = Math.max(intEnv('QB_RETRY_BASE_MS', 200), BACKOFF_BASE_MS);
  const connectTimeoutMs = intEnv('QB_CONNECT_TIMEOUT_MS', 5_000);

  // Each node's URL (QB_AMQP_URL alone without QB_AMQP_HOSTS), shuffled as bridge.js does, and
  // the one to try first: after the node whose connection was lost, which may be down. With the
  // URL's node only, a consumer whose node died consumed nothing until that node came back.
  const urls = nodeUrls(url, hostsEnv());
  let node = 0;

  /** A connection to the first node that takes it (each tried once, from `node`), or the last error. */
  async function connectAny() {
    let failure = null;
    for (let step = 0; step < urls.length; step++) {
      const index = (node + step) % urls.length;
      try {
        const connection = await amqp.connect(urls[index], { timeout: connectTimeoutMs });
        node = index;
        return connection;
      } catch (err) {
        failure = err; // refused, out of reach or silent: the next node
      }
    }
    throw failure;
  }

  const recent = new RecentIds(dedupSize);
  let kept = 0; // distinct results kept
  let rc = null; // set: stop
  let finish;
  const finished = new Promise((resolve) => {
    finish = (code) => {
      if (rc === null) rc = code;
      resolve(rc);
    };
  });
  const timer = expect > 0 ? setTimeout(() => finish(1), timeoutMs) : null;
  for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => finish(0));

  function onMessage(channel, msg) {
    const userId = msg.properties.userId; // RabbitMQ refuses a user-id that is not the publisher's
    if (bridgeUser !== '' && userId !== bridgeUser) {
      // Left in the queue, and the script stops: acked, a wrong QB_BRIDGE_USER would have dropped
      // every real result from the queue every engine shares.
      emit('error', {
        code: 'not_from_bridge',
        message: `a result published by ${JSON.stringify(userId ?? null)}, not by the bridge's user ${JSON.stringify(bridgeUser)} (QB_BRIDGE_USER)`,
        userId: userId ?? null,
        messageId: msg.properties.messageId ?? null,
      });
      channel.nack(msg, false, true);
      finish(1);
      return;
    }
    const headers = msg.properties.headers || {};
    const msgOwner = text(headers['x-owner']);
    const serviceId = msg.fields.routingKey; // the routing key of a result is its serviceId
    const messageId = msg.properties.messageId; // <taskId>:<completionId>: the same on a re-publish
    if ((owner !== '' && msgOwner !== owner) || (service !== '' && serviceId !== service)) {
      emit('skipped', { owner: msgOwner, serviceId, messageId });
      channel.ack(msg);
      return;
    }
    let body;
    try {
      body = JSON.parse(msg.content.toString('utf8'));
      if (body === null || typeof body !== 'object' || Array.isArray(body)) throw new Error('not a JSON object');
    } catch (err) {
      // Not a result this consumer can read: acked (requeued it would come back for ever), and said.
      emit('bad_result', { messageId: messageId ?? null, serviceId, message: String(err.message) });
      channel.ack(msg);
      return;
    }
    if (messageId !== undefined && recent.has(messageId)) {
      channel.ack(msg); // a copy of a result handled already
      return;
    }
    try {
      handle(body, msgOwner, messageId, msg.properties.type);
    } catch (err) {
      // Not handled: its id is not remembered (remembered first, the result came again to be
      // acked as a copy, never handled), and it is requeued, after a pause (at once, a result
      // whose handling fails every time came back as fast as it failed). Left unacked, it held
      // one of the channel's prefetch slots until the connection ended.
      emit('handling_failed', { messageId: messageId ?? null, serviceId, message: String(err?.message ?? err) });
      requeueLater(channel, msg);
      return;
    }
    if (messageId !== undefined) recent.add(messageId);
    kept += 1;
    channel.ack(msg); // after it is handled: a crash before this gets it again (at least once)
    if (expect > 0 && kept >= expect) finish(0);
  }

  /** What this consumer does with a result: print it (replace it with yours; it may throw). */
  function handle(body, msgOwner, messageId, type) {
    const outcome = 'error' in body ? { error: body.error } : { result: body.result };
    emit('result', {
      taskId: body.taskId,
      serviceId: body.serviceId,
      owner: msgOwner,
      token: body.token,
      ...outcome,
      completedAt: body.completedAt ?? null,
      messageId,
      type,
    });
  }

  /** Give `msg` back to the queue QB_RETRY_BASE_MS from now (its channel gone by then: it is anyway). */
  function requeueLater(channel, msg) {
    const timer = setTimeout(() => {
      try {
        channel.nack(msg, false, true);
      } catch {
        // The channel closed meanwhile: the broker requeued it then.
      }
    }, retryBaseMs);
    timer.unref(); // nothing to wait for at the end: a closed channel gives it back too
  }

  /** One connection's life: consume until it is lost (resolves) or refused (rejects). */
  async function consumeOnce() {
    const connection = await connectAny();
    let lost;
    const closed = new Promise((resolve) => {
      lost = resolve;
    });
    connection.on('error', (err) => emit('connection_error', { message: String(err) }));
    connection.on('close', () => lost('connection closed'));
    try {
      const channel = await connection.createChannel();
      channel.on('error', (err) => emit('channel_error', { message: String(err) }));
      channel.on('close', () => lost('channel closed'));
      await channel.prefetch(50);
      let queue = env('QB_RESULTS_QUEUE', 'queue-bridge.results');
      if (pattern !== '') {
        const declared = await channel.assertQueue('', { exclusive: true });
        queue = declared.queue;
        await channel.bindQueue(queue, env('QB_RESULTS_EXCHANGE', 'queue-bridge.results'), pattern);
      }
      await channel.consume(queue, (msg) => {
        if (msg === null) return lost('consumer cancelled'); // the queue deleted, or moved
        try {
          onMessage(channel, msg);
        } catch (err) {
          // Never let one message end the consumer (an ack on a channel closed meanwhile): say it
          // and leave it unacked (it comes back with the next connection, or to another consumer).
          emit('error', { code: null, message: `handling ${msg.properties.messageId}: ${err}` });
        }
        return undefined;
      });
      emit('ready', { queue }); // consuming (and, with QB_BIND, bound): results published from now on reach us
      return await Promise.race([closed, finished.then(() => null)]);
    } finally {
      // Bounded: a connection gone silent never answers the close (the script hung until killed).
      await closeBounded(connection, connectTimeoutMs);
    }
  }

  /** A pause that the end (a signal, QB_EXPECT reached, the timeout) cuts short. */
  const pause = (ms) =>
    new Promise((resolve) => {
      const wait = setTimeout(resolve, ms);
      finished.then(() => {
        clearTimeout(wait);
        resolve();
      });
    });

  let failed = 0;
  while (rc === null) {
    try {
      const why = await consumeOnce();
      if (why === null || rc !== null) break; // finished
      failed = 0;
      node = (node + 1) % urls.length; // its node may be the trouble: start after it
      const pauseMs = backoffMs(1, retryBaseMs);
      emit('reconnecting', { message: why, pauseMs });
      await pause(pauseMs);
    } catch (err) {
      if (REFUSED.has(err.code) && !homeNodeDown(err)) {
        emit('error', { code: err.code, message: String(err) }); // e.g. 403 ACCESS_REFUSED: misconfigured
        finish(1);
        break;
      }
      failed += 1;
      node = (node + 1) % urls.length; // lost while setting up, or every node failed: move on
      const pauseMs = backoffMs(failed, retryBaseMs);
      emit('reconnecting', { message: String(err.message ?? err), pauseMs });
      await pause(pauseMs);
    }
  }
  if (timer) clearTimeout(timer);
  return finished;
}

run(main);

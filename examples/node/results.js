'use strict';
// The engine's results consumer: read result messages, keep those of one owner and service.
//
//   QB_AMQP_URL          amqp://engine:engine@127.0.0.1:5672/
//   QB_RESULTS_QUEUE     queue-bridge.results   (BRIDGE_RESULTS_QUEUE) the queue to consume
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
//
// Results are at least once: de-duplicated on the `message-id` property. The results queue is
// shared by every owner and service: results this consumer does not keep are acked and reported
// as "skipped" (run one consumer per results queue, or bind a queue of your own).
// Prints JSON lines: {"event": "ready", "queue"} once consuming, then {"event": "result", "taskId",
// "serviceId", "owner", "token", "result" | "error", "completedAt", "messageId", "type"} and
// {"event": "skipped", ...}.

const amqp = require('amqplib');
const { emit, env, intEnv, run } = require('./bridge');

function text(value) {
  // Header values of the AMQP table: strings (longstr) may reach us as Buffers.
  return Buffer.isBuffer(value) ? value.toString('utf8') : value;
}

async function main() {
  const url = env('QB_AMQP_URL', 'amqp://engine:engine@127.0.0.1:5672/');
  // Not env(): an empty value means "any" here, not "the default".
  const owner = process.env.QB_OWNER ?? 'worker-a';
  const service = process.env.QB_SERVICE ?? 'demo';
  const expect = intEnv('QB_EXPECT', 0);
  const timeoutMs = intEnv('QB_TIMEOUT_MS', 60_000);
  const pattern = env('QB_BIND', '');

  const connection = await amqp.connect(url);
  connection.on('error', (err) => emit('error', { message: String(err) })); // e.g. 403 ACCESS_REFUSED
  const channel = await connection.createChannel();
  await channel.prefetch(50);
  let queue = env('QB_RESULTS_QUEUE', 'queue-bridge.results');
  if (pattern !== '') {
    const declared = await channel.assertQueue('', { exclusive: true });
    queue = declared.queue;
    await channel.bindQueue(queue, env('QB_RESULTS_EXCHANGE', 'queue-bridge.results'), pattern);
  }

  const seen = new Set();
  let finish;
  const finished = new Promise((resolve) => {
    finish = resolve;
  });
  const timer = expect > 0 ? setTimeout(() => finish(1), timeoutMs) : null;
  for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => finish(0));
  channel.on('close', () => finish(1));
  channel.on('error', (err) => emit('error', { message: String(err) }));

  await channel.consume(queue, (msg) => {
    if (msg === null) return finish(1); // the broker cancelled the consumer (queue deleted)
    const headers = msg.properties.headers || {};
    const msgOwner = text(headers['x-owner']);
    const serviceId = msg.fields.routingKey; // the routing key of a result is its serviceId
    const messageId = msg.properties.messageId; // <taskId>:<completionId>: the same on a re-publish
    if ((owner !== '' && msgOwner !== owner) || (service !== '' && serviceId !== service)) {
      emit('skipped', { owner: msgOwner, serviceId, messageId });
      channel.ack(msg);
      return undefined;
    }
    if (!seen.has(messageId)) {
      seen.add(messageId);
      const body = JSON.parse(msg.content.toString('utf8'));
      const outcome = 'error' in body ? { error: body.error } : { result: body.result };
      emit('result', {
        taskId: body.taskId,
        serviceId: body.serviceId,
        owner: msgOwner,
        token: body.token,
        ...outcome,
        completedAt: body.completedAt ?? null,
        messageId,
        type: msg.properties.type,
      });
    }
    channel.ack(msg); // after it is handled: a crash before this gets it again (at least once)
    if (expect > 0 && seen.size >= expect) finish(0);
    return undefined;
  });
  emit('ready', { queue }); // consuming (and, with QB_BIND, bound): results published from now on reach us

  const rc = await finished;
  if (timer) clearTimeout(timer);
  try {
    await connection.close();
  } catch {
    // already closed
  }
  return rc;
}

run(main);

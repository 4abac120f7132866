'use strict';
// Send one request and print its reply: node request.js METHOD [BODY]
//
//   BODY            the request body, sent as is (default {}); it need not be JSON, e.g. to see
//                   the bridge answer bad_request
//   QB_AMQP_URL     amqp://worker-a:worker-a@127.0.0.1:5672/
//   QB_EXCHANGE     queue-bridge
//   QB_HEADERS      application headers as a JSON object, e.g. {"x-owner": "worker-a"}
//   QB_USER_ID      the user-id property (default: the URL's user; "-" leaves it out)
//   QB_MESSAGE_ID   the message-id property (the idempotency key of an add)
//   QB_TIMEOUT_MS   10000
//   QB_CONNECT_TIMEOUT_MS 5000  how long connecting to RabbitMQ may take, and closing the connection
//
// Prints one JSON line: {"event": "reply", "type", "correlationId", "messageId", "body"} (an error
// reply too); exit 0 on any reply, 2 when none comes in time, RabbitMQ cannot be reached or an
// option is wrong (then before connecting).

const { BridgeClient, emit, env, intEnv, run } = require('./bridge');

async function main() {
  const [method, body = '{}'] = process.argv.slice(2);
  if (!method) {
    process.stderr.write('usage: node request.js METHOD [BODY]\n');
    return 64;
  }
  // Every option first: one that is wrong must end the script before a connection keeps it alive.
  const userId = env('QB_USER_ID', undefined);
  let headers;
  try {
    headers = JSON.parse(env('QB_HEADERS', '{}'));
  } catch (err) {
    throw new Error(`QB_HEADERS must be a JSON object: ${err.message}`);
  }
  if (headers === null || typeof headers !== 'object' || Array.isArray(headers)) {
    throw new Error('QB_HEADERS must be a JSON object');
  }
  const options = {
    raw: Buffer.from(body, 'utf8'),
    headers,
    timeoutMs: intEnv('QB_TIMEOUT_MS', 10_000),
    userId: userId === '-' ? null : userId,
    messageId: env('QB_MESSAGE_ID', undefined),
  };
  const client = new BridgeClient({
    url: env('QB_AMQP_URL', 'amqp://worker-a:worker-a@127.0.0.1:5672/'),
    exchange: env('QB_EXCHANGE', 'queue-bridge'),
    connectTimeoutMs: intEnv('QB_CONNECT_TIMEOUT_MS', 5_000),
  });
  try {
    const reply = await client.request(method, null, options).catch((err) => {
      if (err.reply === undefined) throw err; // no reply at all
      return err.reply; // an error reply: print it like any other
    });
    emit('reply', {
      type: reply.properties.type,
      correlationId: reply.properties.correlationId ?? null,
      messageId: reply.properties.messageId ?? null,
      body: reply.body,
    });
    return 0;
  } catch (err) {
    emit('error', { code: err.code ?? null, message: String(err.message) });
    return 2;
  } finally {
    await client.close();
  }
}

run(main, 2);

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
//
// Prints one JSON line: {"event": "reply", "type", "correlationId", "messageId", "body"} (an error
// reply too); exit 0 on any reply, 2 when none comes in time.

const { BridgeClient, emit, env, intEnv, run } = require('./bridge');

async function main() {
  const [method, body = '{}'] = process.argv.slice(2);
  if (!method) {
    process.stderr.write('usage: node request.js METHOD [BODY]\n');
    return 64;
  }
  const client = await BridgeClient.open({
    url: env('QB_AMQP_URL', 'amqp://worker-a:worker-a@127.0.0.1:5672/'),
    exchange: env('QB_EXCHANGE', 'queue-bridge'),
  });
  const userId = env('QB_USER_ID', undefined);
  const options = {
    raw: Buffer.from(body, 'utf8'),
    headers: JSON.parse(env('QB_HEADERS', '{}')),
    timeoutMs: intEnv('QB_TIMEOUT_MS', 10_000),
    userId: userId === '-' ? null : userId,
    messageId: env('QB_MESSAGE_ID', undefined),
  };
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

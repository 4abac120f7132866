'use strict';
// A small queue-bridge client for Node.js, written from docs/asyncapi.yaml alone (amqplib).
//
// The wire contract in a few lines (the document says the rest):
// * A request is a JSON body published to the bridge's direct exchange (`queue-bridge`) with the
//   method as routing key (`add`, `fetch`, `ack`, `extend`, ...).
// * AMQP 0-9-1 *properties* (not entries of the `headers` table): `user-id` = your AMQP user name
//   (RabbitMQ checks it), `reply-to` and `correlation-id` for every RPC, `message-id` as the
//   idempotency key of an add. amqplib spells them userId, replyTo, correlationId, messageId.
// * Application *headers* (the `headers` table): `x-owner` (trusted engines only), `x-deadline`
//   (ms since the epoch after which we no longer wait), `traceparent`.
// * Replies come through RabbitMQ direct reply-to: consume the pseudo-queue
//   `amq.rabbitmq.reply-to` with no-ack, then publish with reply-to `amq.rabbitmq.reply-to` on
//   the *same channel*. A reply echoes the request's correlation-id; its AMQP `type` is `result`
//   or `error`, and an error body is {"error": {"code", "message"}}.

const crypto = require('node:crypto');
const amqp = require('amqplib');

const DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to';
const OFFSET_WINDOW_MS = 60_000; // replies whose x-now the clock offset is taken from (the largest of them)
const BACKOFF_CAP_MS = 5_000; // the longest pause between retries (backoffMs)
// The least a worker's pauses start from, whatever QB_POLL_MS (rpc.py BACKOFF_BASE_S): a base of 0
// makes every backoffMs 0, and a fleet retried a refused connect as fast as its loops turned.
const BACKOFF_BASE_MS = 100;

function env(name, fallback) {
  const value = process.env[name];
  return value === undefined || value === '' ? fallback : value;
}

function intEnv(name, fallback) {
  const text = env(name, String(fallback)).trim();
  if (!/^-?\d+$/.test(text)) throw new Error(`${name} must be an integer, not ${JSON.stringify(text)}`);
  return Number.parseInt(text, 10);
}

/** The user of an AMQP URL: what the `user-id` property must say (RabbitMQ's default: guest). */
function userOf(url) {
  return decodeURIComponent(new URL(url).username) || 'guest';
}

/**
 * The URLs of a RabbitMQ cluster's nodes: `url` (user, vhost, options) with each of `hosts`
 * (`host[:port]`, as the bridge's BRIDGE_AMQP_HOSTS) as its host, shuffled so that a fleet of
 * clients spreads over the nodes; `url` alone without hosts.
 */
function nodeUrls(url, hosts) {
  if (!hosts || hosts.length === 0) return [url];
  const urls = hosts.map((host) => {
    const node = new URL(url);
    node.host = host; // keeps the URL's port when host names none
    return node.toString();
  });
  for (let i = urls.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [urls[i], urls[j]] = [urls[j], urls[i]];
  }
  return urls;
}

/** QB_AMQP_HOSTS (comma separated host[:port]) as a list; empty: none. */
function hostsEnv(name = 'QB_AMQP_HOSTS') {
  return env(name, '')
    .split(',')
    .map((h) => h.trim())
    .filter((h) => h !== '');
}

/** One JSON line on stdout per event: easy to read, and easy for a test to parse. */
function emit(event, fields) {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);
}

// Requests whose late replies still tell the bridge's time (a few seconds of a busy client's).
const ISSUED_REMEMBERED = 4096;

// RabbitMQ's reason for closing a channel whose publish was over its max_message_size.
const BROKER_MAX_SIZE = /larger than (?:configured )?max size (\d+)/; // both of RabbitMQ's wordings

/** An error reply of the bridge (`type: error`): `code` is one of the document's ErrorCode. */
class BridgeError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = 'BridgeError';
    this.code = code;
    this.detail = message;
  }
}

/** No reply in time: the request may or may not have run. Safe to retry (an add with its message-id). */
class RequestTimeout extends Error {
  constructor(method, ms) {
    super(`no reply to ${method} within ${ms} ms`);
    this.name = 'RequestTimeout';
    this.code = 'timeout';
  }
}

/**
 * The transport failed under a request (code `connection_lost`): the connection or channel was
 * lost while it waited (a broker restart, a failover, an operator's close), the publish failed, or
 * no node could be reached (refused, out of reach, no handshake within the connect timeout), or
 * the broker refused it (closed the channel: no such exchange yet, no permission).
 * `sent`: whether the request may have reached a bridge (it may then have run). Safe to retry
 * as a timeout is: an add with the same message-id, an ack naming its task.
 */
class ConnectionLost extends Error {
  constructor(message, { sent = true, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'ConnectionLost';
    this.code = 'connection_lost';
    this.sent = sent;
  }
}

/**
 * The request was cut short by close() (code `closed`): this client is going away; do not retry.
 * `sent`, as for ConnectionLost: whether it may have reached the broker (a long-poll fetch given
 * up so may still claim a task for its worker at a busy bridge: the worker asks for it on stop).
 */
class ClientClosed extends Error {
  constructor({ sent = true } = {}) {
    super('client closed');
    this.name = 'ClientClosed';
    this.code = 'closed';
    this.sent = sent;
  }
}

/**
 * The pause (ms) before retry number `failed` (1, 2, ...): full jitter, uniform between 0 and
 * `baseMs` doubled per failure, at most `capMs`. A fleet that lost RabbitMQ or its bridge at the
 * same moment then comes back spread out, instead of all at once and again and again in step.
 * A `baseMs` of 0 pauses never: worker.js floors its base at BACKOFF_BASE_MS.
 */
function backoffMs(failed, baseMs, capMs = BACKOFF_CAP_MS) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(Math.max(failed - 1, 0), 30));
  return Math.floor(Math.random() * ceiling);
}

/**
 * Close an amqplib connection, waiting `ms` at most, never rejecting (it is given up either way):
 * amqplib's close() waits for the broker's close-ok, and a path to the broker that went silent (a
 * black-holing firewall, a half-dead node: the socket stays open, nothing comes back) never
 * answers it: close() never settled, and a stopping worker hung in it for good. Then the socket is
 * destroyed, with an error, so that amqplib ends the connection (its heartbeat timers with it,
 * which would keep the process alive) as it does a lost one. As rpc.py's _close_bounded.
 */
async function closeBounded(connection, ms) {
  let timer;
  const gaveUp = new Promise((resolve) => {
    timer = setTimeout(() => resolve(true), ms);
  });
  try {
    const silent = await Promise.race([connection.close().then(() => false, () => false), gaveUp]);
    if (silent) dropConnection(connection, `no close-ok within ${ms} ms`);
  } finally {
    clearTimeout(timer);
  }
}

/** End an amqplib connection at once, without the close handshake: its socket is destroyed. */
function dropConnection(connection, why) {
  connection.connection.stream.destroy(new Error(why));
}

class BridgeClient {
  /**
   * Connect and get ready for RPCs: one channel that consumes direct reply-to and publishes the
   * requests (the broker delivers replies only to the channel that published with that reply-to).
   */
  static async open(options) {
    const client = new BridgeClient(options);
    await client.connectOnce();
    return client;
  }

  /**
   * A client not connected yet: its first request connects (a failure to connect then rejects
   * that request with ConnectionLost, for the caller's retry loop). `connectTimeoutMs`: how long
   * one node may take to accept the connection and finish the AMQP handshake (default 5 s), and
   * to answer our close of it (see closeBounded).
   */
  constructor({ url, exchange, hosts = [], connectTimeoutMs = 5_000 }) {
    this.url = url;
    this.connectTimeoutMs = connectTimeoutMs;
    // With hosts (a cluster's nodes): a new connection starts at the node after the one whose
    // connection was lost or left a request without a reply; each node is tried in turn.
    this.urls = nodeUrls(url, hosts);
    this.node = 0;
    this.user = userOf(url);
    this.exchange = exchange;
    this.connection = null;
    this.channel = null; // null: not connected (never, or lost); the next request connects again
    this.pending = new Map(); // correlation-id -> {resolve, reject, timer, method}
    // The connect() under way, shared by every request that finds the client disconnected: each
    // connecting on its own (requests sent together, an engine's Promise.all), all but the last
    // connection were left open (close() closes the one kept) and the process never exited.
    this.connecting = null;
    this.closes = 0; // close() calls: a connect() under way when one comes is given up
    this.cuts = new Set(); // what close() calls to cut short the step of a connect() under way
    // The channel a request got no reply on: the next request connects afresh. On RabbitMQ
    // before 3.11 a channel whose first publish to a quorum queue came during a leader election
    // keeps sending to the lost leader (rabbitmq-server#9208), and retries on it are dropped.
    this.suspect = null;
    // Method -> when a reply to it last came: a timeout while others of the same method are
    // answered is a slow bridge, not a stuck channel (the connection is kept).
    this.replied = new Map();
    // The bridge's clock less this host's *monotonic* clock (performance.now(), ms), from the
    // replies' x-now header (null until one says it): request deadlines are judged on the
    // bridge's clock, and a host clock behind it by more than a request's timeout had every
    // request dropped as late. The largest offset of the last minute's replies: a reply that
    // waited (in the broker, or for this process's busy event loop) says a time already past, so
    // its offset is too small by the delay; the largest is the least delayed. Against the
    // monotonic clock, so that a step of this host's wall clock (NTP, an operator) does not move
    // the deadlines.
    this.monoOffsetMs = null;
    this.offsets = []; // [seenAt (performance.now()), offset]: a sliding maximum, largest first
    // The correlation ids of the last requests sent (insertion order): only a reply to one of them,
    // a late one included, tells the bridge's time (see onReply).
    this.issued = new Set();
  }

  /** The bridge's time now (ms since the epoch), as this host reckons it from the replies' x-now. */
  bridgeNow() {
    if (this.monoOffsetMs === null) return Date.now(); // no reply yet: this host's clock
    return Math.round(performance.now() + this.monoOffsetMs);
  }

  /** The bridge's clock less this host's wall clock (ms) now; 0 until a reply said it. */
  get clockOffsetMs() {
    return this.monoOffsetMs === null ? 0 : this.bridgeNow() - Date.now();
  }

  /** Take the offset of the bridge's clock from a reply's x-now (a late reply's too). */
  learnClock(now) {
    if (!Number.isSafeInteger(now) || now <= 0) return;
    const seenAt = performance.now();
    const offset = now - seenAt;
    // Offsets no larger than a newer one can never be the maximum again: drop them.
    while (this.offsets.length > 0 && this.offsets[this.offsets.length - 1][1] <= offset) this.offsets.pop();
    this.offsets.push([seenAt, offset]);
    while (seenAt - this.offsets[0][0] > OFFSET_WINDOW_MS) this.offsets.shift();
    this.monoOffsetMs = this.offsets[0][1];
  }

  /**
   * `step` (a promise: one step of connect()), or a rejection as soon as close() comes
   * (ClientClosed, `sent` false) or `ms` (null: no bound) passed without it (an Error whose
   * `silent` is true). What a step given up brings later is handed to `late` (a connection: closed).
   */
  async cuttable(step, ms, late = () => {}) {
    let timer = null;
    let cut = null;
    const givenUp = new Promise((resolve) => {
      cut = () => resolve(new ClientClosed({ sent: false }));
      const silent = () => resolve(Object.assign(new Error(`no answer within ${ms} ms`), { silent: true }));
      if (ms !== null) timer = setTimeout(silent, ms);
    });
    this.cuts.add(cut);
    const outcome = step.then((value) => ({ value }), (error) => ({ error }));
    try {
      const first = await Promise.race([outcome, givenUp]);
      if (first instanceof Error) {
        outcome.then((o) => 'value' in o && late(o.value));
        throw first;
      }
      if ('error' in first) throw first.error;
      return first.value;
    } finally {
      clearTimeout(timer);
      this.cuts.delete(cut);
    }
  }

  /** connect(), or the one already under way: one connection, however many requests wait for it. */
  connectOnce() {
    if (this.connecting === null) {
      this.connecting = this.connect().finally(() => {
        this.connecting = null;
      });
    }
    return this.connecting;
  }

  /**
   * (Re)connect (callers go through connectOnce): a connection and one channel that consumes
   * direct reply-to. A channel the broker closed (a publish to an exchange that does not exist
   * yet: 404) or a lost connection (a broker restart, an operator's close) fails the requests in
   * flight and leaves the client disconnected; the next request connects again, so a worker's
   * retry loop recovers by itself.
   */
  async connect() {
    // One pass over the nodes (each tried once, from the one after the node last lost): a caller
    // that gets ConnectionLost pauses (backoffMs) before it asks again, so a fleet whose broker is
    // down does not hammer it.
    const closes = this.closes;
    let connection = null;
    let failure = null;
    for (let step = 0; step < this.urls.length && connection === null; step++) {
      const index = (this.node + step) % this.urls.length;
      try {
        // The timeout bounds the TCP connect and the AMQP handshake: a node that accepts and
        // never answers (stalled, half dead, a black-holing firewall) would hang us for good.
        // close() cuts it short: a connection it brings after all is closed.
        const connecting = amqp.connect(this.urls[index], { timeout: this.connectTimeoutMs });
        connection = await this.cuttable(connecting, null, (late) => {
          late.on('error', () => {});
          closeBounded(late, this.connectTimeoutMs);
        });
        this.node = index;
      } catch (err) {
        if (err instanceof ClientClosed) throw err;
        failure = err; // refused, out of reach or silent: the next node
      }
    }
    if (connection === null) {
      throw new ConnectionLost(`could not connect to RabbitMQ: ${failure.message}`, { sent: false, cause: failure });
    }
    // A connection error also closes the channel: listen, so that it is not an unhandled 'error'.
    connection.on('error', () => {});
    if (this.closes !== closes) {
      // close() came while we connected (a worker told to stop): this connection is not wanted.
      await closeBounded(connection, this.connectTimeoutMs);
      throw new ClientClosed({ sent: false });
    }
    let channel;
    let refusal = null; // the broker's reason, when it closed the channel over a request of ours
    const open = async () => {
      const opened = await connection.createChannel();
      // The 'close' that follows says it; its code tells a refusal from a loss.
      opened.on('error', (err) => {
        refusal = err;
      });
      await opened.consume(DIRECT_REPLY_TO, (msg) => this.onReply(msg), { noAck: true });
      return opened;
    };
    try {
      // Bounded as the handshake is, and cut short by close(): a node silent once the handshake
      // was done held createChannel() (every request waiting for this connect, a stopping worker
      // with them) until the heartbeats gave up, minutes later.
      channel = await this.cuttable(open(), this.connectTimeoutMs);
    } catch (err) {
      // Silent, or we are going away: its close would wait for an answer as long (dropped).
      if (err.silent || err instanceof ClientClosed) dropConnection(connection, err.message);
      else await closeBounded(connection, this.connectTimeoutMs);
      if (err instanceof ClientClosed) throw err;
      throw new ConnectionLost(`could not open a channel: ${err.message}`, { sent: false, cause: err });
    }
    if (this.closes !== closes) {
      await closeBounded(connection, this.connectTimeoutMs);
      throw new ClientClosed({ sent: false });
    }
    const lost = () => {
      if (this.channel !== channel) return; // an earlier channel's late event
      this.channel = null;
      this.node = (this.node + 1) % this.urls.length; // its node may be the trouble: start after it
      // 404 (no such exchange: no bridge declared it yet) or 403 (no permission on it): RabbitMQ
      // refused our publishes to the exchange, and so the requests in flight: none reached a
      // bridge (`sent` false: a worker then knows no fetch of it can claim anything), as rpc.py's
      // BrokerRefused. Any other close may have come after a request was taken.
      const refused = refusal !== null && (refusal.code === 404 || refusal.code === 403);
      const why = refused
        ? `RabbitMQ refused the request: ${refusal.message}`
        : 'connection lost: the channel was closed';
      // 406 "message size N is larger than configured max size M": the broker refused a request
      // over its max_message_size. That one is payload_too_large, as the bridge's own refusal of
      // a value over its limit: taken for a lost connection it was sent again and again (an
      // engine's add until its retries ran out, a worker's ack until the lease ended).
      const bound = refusal !== null && refusal.code === 406 ? BROKER_MAX_SIZE.exec(String(refusal.message)) : null;
      const tooLarge = (call) =>
        bound !== null && call.size > Number(bound[1])
          ? new BridgeError(
              'payload_too_large',
              `the request's ${call.size} bytes are over RabbitMQ's max_message_size (${bound[1]}): refused by the broker`,
            )
          : null;
      this.failAll(new ConnectionLost(why, { sent: !refused }), tooLarge);
      closeBounded(connection, this.connectTimeoutMs); // a 404 closes only the channel: drop its connection too
    };
    channel.on('close', lost);
    connection.on('close', lost);
    this.connection = connection;
    this.channel = channel;
  }

  /** Reject every request in flight with `err`, or with what `own(call)` says for it (non-null). */
  failAll(err, own = () => null) {
    for (const [id, call] of this.pending) {
      clearTimeout(call.timer);
      call.reject(own(call) ?? err);
      this.pending.delete(id);
    }
  }

  onReply(msg) {
    if (msg === null) return; // consumer cancelled by the broker
    const id = msg.properties.correlationId;
    // A reply to a request of ours tells the bridge's time, a late one too; not any message: one
    // with a far-future x-now (from whoever learns the reply-to address and may publish to the
    // default exchange) moved the clock for a minute, every deadline with it.
    if (id !== undefined && this.issued.has(id)) this.learnClock((msg.properties.headers || {})['x-now']);
    const call = id === undefined ? undefined : this.pending.get(id);
    if (call === undefined) return; // late reply to a request we gave up on: drop it
    this.pending.delete(id);
    clearTimeout(call.timer);
    this.replied.set(call.method, performance.now());
    let body;
    try {
      body = JSON.parse(msg.content.toString('utf8'));
    } catch (err) {
      call.reject(new Error(`reply is not JSON: ${err.message}`));
      return;
    }
    const reply = { body, properties: msg.properties };
    if (msg.properties.type === 'error') {
      const error = new BridgeError(body.error.code, body.error.message);
      error.reply = reply;
      call.reject(error);
    } else {
      call.resolve(reply);
    }
  }

  /**
   * Send one request and wait for its reply. Resolves to {body, properties} for a `result`
   * reply; rejects with BridgeError for an `error` reply, RequestTimeout when none comes,
   * ConnectionLost when the transport failed (not connected, lost while waiting), ClientClosed
   * when close() cut it short.
   *
   * options: headers (application headers), messageId, timeoutMs (default 10 s; also sets the
   * `x-deadline` header), raw (a Buffer sent as is: no JSON), userId (default: the connection's
   * user; `null` leaves the property out).
   */
  async request(method, body, options = {}) {
    if (this.channel !== null && this.channel === this.suspect) {
      const { connection } = this;
      this.channel = null;
      this.node = (this.node + 1) % this.urls.length;
      this.failAll(new ConnectionLost('connection replaced after a request without a reply'));
      closeBounded(connection, this.connectTimeoutMs); // in the background: this request does not wait
    }
    // Lost earlier, or never connected: a failure here is the caller's to retry.
    if (this.channel === null) await this.connectOnce();
    const timeoutMs = options.timeoutMs ?? 10_000;
    const correlationId = crypto.randomUUID();
    this.issued.add(correlationId);
    if (this.issued.size > ISSUED_REMEMBERED) this.issued.delete(this.issued.values().next().value);
    const content = options.raw ?? Buffer.from(JSON.stringify(body));
    const headers = { ...(options.headers || {}) };
    if (method !== 'add' && headers['x-deadline'] === undefined) {
      headers['x-deadline'] = this.bridgeNow() + timeoutMs; // on the bridge's clock; refused once past
    }
    const properties = {
      replyTo: DIRECT_REPLY_TO,
      correlationId,
      contentType: 'application/json',
      deliveryMode: 2,
      timestamp: Math.floor(this.bridgeNow() / 1000), // AMQP timestamps are whole seconds
      headers,
    };
    const userId = options.userId === undefined ? this.user : options.userId;
    if (userId !== null) properties.userId = userId;
    if (options.messageId !== undefined) properties.messageId = options.messageId;
    return new Promise((resolve, reject) => {
      const channel = this.channel;
      const sentAt = performance.now();
      const timer = setTimeout(() => {
        this.pending.delete(correlationId);
        if ((this.replied.get(method) ?? -1) < sentAt) this.suspect = channel;
        reject(new RequestTimeout(method, timeoutMs));
      }, timeoutMs);
      this.pending.set(correlationId, { resolve, reject, timer, method, size: content.length });
      try {
        this.channel.publish(this.exchange, method, content, properties);
      } catch (err) {
        clearTimeout(timer);
        this.pending.delete(correlationId);
        // A channel that closed unseen (its close came in the same read as the consume's answer,
        // before our listeners) throws at every publish: dropped, the next request connects
        // again; kept, every request failed the same way for ever.
        if (this.channel === channel) {
          const { connection } = this;
          this.channel = null;
          if (connection !== null) closeBounded(connection, this.connectTimeoutMs);
        }
        reject(new ConnectionLost(`publish failed: ${err.message}`, { sent: false, cause: err }));
      }
    });
  }

  /**
   * Close the connection: the requests in flight reject with ClientClosed (their direct reply-to
   * is gone with the channel, so a long-poll fetch waiting at a bridge claims nothing more; one
   * still queued at a busy bridge may claim a ready task at once: worker.js asks for it on stop),
   * and so does a connect() under way, at once (a connection it brings later is closed; one
   * whose channel is opening is dropped). A later request connects again. Bounded: a broker that
   * does not answer the close within connectTimeoutMs has its socket destroyed (closeBounded).
   */
  async close() {
    const { connection } = this;
    this.closes += 1;
    for (const cut of this.cuts) cut(); // a connect() under way: given up at once
    this.channel = null;
    this.failAll(new ClientClosed());
    if (connection === null) return;
    this.connection = null;
    await closeBounded(connection, this.connectTimeoutMs);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Runs a script's async main: its result is the exit code; a crash is one JSON error line and
// exit code `crashCode`.
function run(main, crashCode = 1) {
  main().then(
    (rc) => {
      process.exitCode = rc;
    },
    (err) => {
      emit('error', { code: null, message: String(err) });
      process.exitCode = crashCode;
    },
  );
}

module.exports = {
  BACKOFF_BASE_MS,
  BACKOFF_CAP_MS,
  BridgeClient,
  BridgeError,
  ClientClosed,
  ConnectionLost,
  DIRECT_REPLY_TO,
  RequestTimeout,
  backoffMs,
  closeBounded,
  emit,
  env,
  hostsEnv,
  intEnv,
  nodeUrls,
  run,
  sleep,
  userOf,
};

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
//                                  a row, up to 5 s, full jitter); 100 at least (0 is taken as 100)
//   QB_TTR_MS     30000            timeToRecover: the lease; unacked, the task comes back after it
//   QB_MAX_TASKS  0                stop after this many tasks (0: until SIGTERM/SIGINT)
//   QB_IDLE_EXIT  0                stop after this many empty fetches in a row (0: never)
//   QB_WORK_MS    0                the demo work's duration (stands for your handler's time)
//   QB_STOP_TIMEOUT_MS 20000       after SIGTERM/SIGINT, how long the task in hand may still take:
//                                  then it is given back (`fail`, retryInMs 0) to come again at once
//   QB_STOP_GRACE_MS 5000          at the stop, how long it may go on asking whether a fetch it gave
//                                  up on (or that got no answer) claimed a task for it (Worker.stop_grace)
//   QB_CONNECT_TIMEOUT_MS 5000     how long connecting to one RabbitMQ node may take (the handshake,
//                                  then opening the channel), and how long closing a connection may
//                                  (then its socket is destroyed)
//
// The work: {"upper": value.text upper-cased, "n": value.n}; a value with "fail": true is acked
// with a business error instead ({"message": ...}): it reaches the engine as an error result; a
// value with "throw": X has the work throw X as it is (a handler's crash: the task is given back).
// Prints JSON lines: {"event": "task", ...}, {"event": "acked", "taskId", "completed"},
// {"event": "fetch_failed", "code", "message", "pauseMs"}, {"event": "ack_failed", ...},
// {"event": "result_in_hand", "taskId", "epoch"}, {"event": "given_back", "taskId", "reason",
// "answered"}, {"event": "give_back_failed", "taskId", "attempt", "code", "message"},
// {"event": "fail_in_hand", "taskId", "epoch", "resent"}, {"event": "stopping", "signal"},
// {"event": "draining", "forMs"}, {"event": "drain_failed", "code", "message", "pauseMs"},
// {"event": "drained", "tasks", "unsure"}.
//
// What ends the loop, as the Python client's Worker.run:
// * Only an answer that says this worker itself is wrong (bad_request, payload_too_large,
//   unauthorized, unknown_owner on a fetch): no retry fixes it, exit 1 with the error.
// * Anything else about a fetch (no reply, the connection lost, RabbitMQ out of reach,
//   `unavailable`, `internal`, a code this script does not know) pauses and fetches again, a
//   little longer each time; `integrity_error` (a task the bridge could not open and
//   dead-lettered) fetches again at once.
// * An ack without an answer (or `unavailable`) is sent again, backing off, while the task's lease
//   lasts (its `leaseExpiresAt`, on the bridge's clock), 3 times at least; on stop for
//   QB_STOP_GRACE_MS at most (as the Python Worker's _ack_in_loop). It names its task, so it can
//   never complete another one. Given up after 3 tries (under a second), the next fetch handed the
//   task back and its handler ran a second time whenever RabbitMQ was away a few seconds as a task
//   finished: the result is in hand, so the ack waits for the broker instead. Past the lease the
//   task may be another worker's: the next fetch, not `fresh`, then hands it back only if nobody
//   took it and the ack never applied. An ack the bridge refuses (payload_too_large: the result
//   is larger than BRIDGE_MAX_VALUE_BYTES; bad_request; ...) cannot succeed by being sent again:
//   the task is given back with `fail` instead of being left leased to us until its lease runs
//   out.
// * A task whose work threw (whatever it threw: an Error, `null`, a string) is given back with
//   `fail`, to come again after the bridge's backoff. A fail without an answer (or `unavailable`)
//   may not have applied: the next fetch (not `fresh`) then hands the same lease (id and epoch)
//   back, and the fail is sent again instead of the work running again at once (skipping the
//   backoff, never counting toward parking), 2 times at most (rpc.py _fail_in_hand). On stop it
//   is sent again, backing off, within QB_STOP_GRACE_MS instead.
// * After a fetch that got no answer, the worker says `fresh` again only once a fetch without
//   it, sent past that fetch's deadline, was answered: until then the bridge may have claimed a
//   task for it that its pointer names and no fetch has read (rpc.py _pointer_unread).
// * SIGTERM/SIGINT: a long-poll under way is given up at once by closing the connection (the
//   bridge checks a waiting fetch's reply-to before it claims a task for it: gone, it claims
//   nothing); the task in hand is finished and acked, or given back after QB_STOP_TIMEOUT_MS.
//   A second signal exits at once (a task in hand returns when its lease runs out).
// * Then, as the Python Worker.run (_claimed_after_stop): a fetch given up at the stop, or one that
//   got no answer, may still claim a task for this worker until its deadline, its reply going
//   nowhere: one still queued at a busy bridge claims a ready task at once, without that check,
//   and so does a claim already past it. Exiting then would leave that task leased to a stopped
//   worker for its whole lease (QB_TTR_MS). So, with its connection closed (nothing waiting can
//   claim any more), the worker asks the bridge every 200 ms whether it holds a task (an `extend`
//   naming none: it reads the worker's pointer and never claims), until that deadline but
//   QB_STOP_GRACE_MS at most, and only when it does fetches it (not `fresh`, not waiting: the
//   bridge hands the task held) and handles it as any. A fetch there would claim the queue's next
//   task: a stopping worker takes no new work. Past that deadline it asks all the same (at least
//   once, again after no answer, within QB_STOP_GRACE_MS) while a fetch without an answer may
//   have claimed a task that no answered fetch has read since (RabbitMQ away until then): that
//   task stayed leased to the stopped worker. Nothing to ask when every fetch was answered.

const os = require('node:os');
const { BACKOFF_BASE_MS, BridgeClient, backoffMs, emit, env, hostsEnv, intEnv, run, sleep } = require('./bridge');

// Fetch answers that say the worker is misconfigured: no retry fixes them (rpc.py MISCONFIGURED).
const MISCONFIGURED = new Set(['bad_request', 'payload_too_large', 'unauthorized', 'unknown_owner']);
// Ack failures after which the ack may have applied or may apply when sent again.
const UNANSWERED = new Set(['timeout', 'connection_lost', 'unavailable']);
// An ack without an answer is sent this many times at least, and then on while the lease lasts.
const ACK_ATTEMPTS = 3;
// A fail without an answer is sent again this many times at most, each time a fetch hands its
// lease back (rpc.py FAIL_RESENDS): with fails never answered while fetches are (the bridges'
// lifecycle consumers down), the lease came back and the fail went again, for ever.
const FAIL_RESENDS = 2;
// On stop, while a fetch without an answer may still claim a task for us: how often we ask the
// bridge whether we hold one (rpc.py STOP_ASK_EVERY_S). Short: the claimed task's lease runs.
const STOP_ASK_EVERY_MS = 200;
const SIGNAL_EXIT = { SIGINT: 130, SIGTERM: 143 };
const CUT = Symbol('cut');

let client = null;
let closing = Promise.resolve(); // the close a signal started (under a long-poll)
let phase = 'idle'; // 'fetching' while a fetch waits: a signal then closes the connection
let stopping = false;
let cutHandler = false; // a handler still ran when we gave its task back
// What the signal tells (a handler's cut-off timer): each listener is removed once its task is
// done. Not a reaction to a promise the signal settles: one such per task stayed attached for the
// life of the process (memory grew with every task), and the signal then started a
// QB_STOP_TIMEOUT_MS timer for every task ever handled, which kept the process alive that long.
const onStop = new Set();
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
    for (const listener of onStop) listener();
    if (wake !== null) wake();
    // A long-poll can wait 30 s: give it up now. With its channel gone, its reply-to is gone, and
    // the bridge, which checks that before it claims a task for a waiting fetch, claims nothing.
    // What it may still claim at a busy bridge is asked for at the end of main (drain).
    if (phase === 'fetching' && client !== null) closing = client.close();
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
  // What a handler's crash looks like, whatever it throws (not always an Error): given back.
  if (value && typeof value === 'object' && 'throw' in value) throw value.throw;
  if (value && value.fail) return { error: { message: `task ${value.n} failed on purpose` } };
  const text = value && typeof value.text === 'string' ? value.text : JSON.stringify(value);
  return { result: { upper: text.toUpperCase(), n: value ? value.n : null } };
}

/** The work, or CUT when a signal came and it still ran stopTimeoutMs later. */
async function handle(value, workMs, stopTimeoutMs) {
  let timer = null;
  let listener = null;
  const cut = new Promise((resolve) => {
    listener = () => {
      timer = setTimeout(() => resolve(CUT), stopTimeoutMs);
    };
    if (stopping) listener(); // signalled before the work began (the drain's task)
    else onStop.add(listener);
  });
  try {
    return await Promise.race([work(value, workMs), cut]);
  } finally {
    // Nothing of this task's is left behind: the listener is removed, the timer (if the signal
    // came meanwhile) cleared, and `cut`, never settled then, is unreferenced and collected.
    onStop.delete(listener);
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
  const stopGraceMs = intEnv('QB_STOP_GRACE_MS', 5_000);
  const connectTimeoutMs = intEnv('QB_CONNECT_TIMEOUT_MS', 5_000);
  // The pause after an empty reply, and the first one after a failure: 100 ms at least (rpc.py
  // BACKOFF_BASE_S). QB_POLL_MS=0 turned every pause off: a fleet's workers retried a refused
  // connect, or a bridge that does not long-poll, as fast as their loops turned.
  const basePauseMs = Math.max(pollMs, BACKOFF_BASE_MS);

  // Not connected yet: the first fetch connects, and RabbitMQ out of reach then is retried as any
  // failed fetch is (a worker may start before its broker).
  client = new BridgeClient({ url, exchange, hosts: hostsEnv(), connectTimeoutMs });

  /**
   * Give a task back (`fail`): it comes again after retryInMs (absent: the bridge's backoff).
   * What the bridge answered (true, or false: the task was no longer ours), null if not answered.
   */
  async function giveBack(task, reason, message, retryInMs) {
    // The error as it is, then its type alone if the bridge refuses that (too large, say).
    const errors = [{ type: reason, message: String(message).slice(0, 4096) }, { type: reason }];
    return sendFail(task, errors, retryInMs, 0);
  }

  /**
   * Fail `task` with the first of `errors` the bridge takes (rpc.py _send_fail); as giveBack. One
   * without an answer may not have applied: its lease is kept (failInHand), and the next fetch
   * (not `fresh`) hands that lease back if so: the fail is then sent again (`resent`: how many
   * times so far), not the handler run again. On stop no fetch comes: it is sent again within
   * QB_STOP_GRACE_MS instead (a give-back without an answer left the task leased to a stopped
   * worker for its whole lease).
   */
  async function sendFail(task, errors, retryInMs, resent) {
    const named = { serviceId, workerId, taskId: task.id, epoch: task.epoch };
    if (retryInMs !== undefined) named.retryInMs = retryInMs;
    const until = stopping ? performance.now() + stopGraceMs : null;
    for (const error of errors) {
      try {
        const answered = await failUntil(task, { ...named, error }, until);
        emit('given_back', { taskId: task.id, reason: error.type, answered });
        return answered;
      } catch (err) {
        if (!UNANSWERED.has(err.code) && err.code !== 'closed') continue; // refused: the next error
        // (A bridge before 1.1 names no epoch: no lease to recognise.)
        if (task.epoch != null && resent < FAIL_RESENDS) {
          failInHand = { id: task.id, epoch: task.epoch, error, retryInMs, resent };
        }
        break;
      }
    }
    emit('given_back', { taskId: task.id, reason: errors[0].type, answered: null }); // its lease ends it
    return null;
  }

  /** One fail; without an answer sent again, backing off, until `until` (null: not again). */
  async function failUntil(task, body, until) {
    for (let attempt = 1; ; attempt++) {
      try {
        return (await client.request('fail', body)).body.result;
      } catch (err) {
        emit('give_back_failed', { taskId: task.id, attempt, code: err.code ?? null, message: String(err.message) });
        if (!UNANSWERED.has(err.code) && err.code !== 'closed') throw err;
        if (until === null || performance.now() >= until) throw err;
        await sleep(Math.max(0, Math.min(until - performance.now(), backoffMs(attempt, basePauseMs))));
      }
    }
  }

  /**
   * Until when (performance.now(), ms) an ack of `task` that gets no answer is sent again: while
   * its lease lasts, judged on the bridge's clock as the lease is (rpc.py _ack_retry_until); when
   * stopping, QB_STOP_GRACE_MS at most. A lease end that does not parse: the attempts alone.
   */
  function ackRetryUntil(task) {
    let left = Date.parse(task.leaseExpiresAt) - client.bridgeNow();
    if (Number.isNaN(left)) return 0;
    if (stopping) left = Math.min(left, stopGraceMs);
    return performance.now() + left;
  }

  /** Ack (sent again after no answer); true/false as answered, null when not applied. */
  async function ackTask(task, outcome) {
    // Name the task and its lease: this ack completes exactly that, or answers false.
    const ack = { serviceId, workerId, taskId: task.id, epoch: task.epoch, hasToken: task.hasToken, ...outcome };
    let until = ackRetryUntil(task);
    let graced = stopping; // the stop's bound applied to `until`
    let attempt = 0;
    // At least ACK_ATTEMPTS, but on stop one, then the grace bounds them (three tries of the whole
    // timeout outlasted Kubernetes' 30 s).
    while (attempt < (stopping ? 1 : ACK_ATTEMPTS) || performance.now() < until) {
      attempt += 1;
      if (stopping && !graced) {
        // Told to stop while the ack was being sent again (a broker outage): the retries end
        // within the grace, not at the lease's end (QB_TTR_MS: the pod would run until killed).
        graced = true;
        until = Math.min(until, performance.now() + stopGraceMs);
        if (performance.now() >= until) break;
      }
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
        // Backing off (full jitter, up to 5 s), as a failed fetch does; never past `until` once
        // the first attempts are spent. A signal cuts the pause short, and the next attempt then
        // bounds the retries by the grace.
        let pauseMs = backoffMs(attempt, basePauseMs);
        if (attempt >= ACK_ATTEMPTS) pauseMs = Math.min(pauseMs, Math.max(0, until - performance.now()));
        if (stopping) await sleep(pauseMs);
        else await pause(pauseMs);
      }
    }
    // Past the lease (or the grace): the next fetch (not `fresh`) hands the task back if the ack
    // never applied and nobody took it; on stop it returns when its lease ends. Its outcome is
    // kept: handed back (that fetch, or the drain at stop), it is acked, not worked again.
    resultInHand = { id: task.id, epoch: task.epoch, outcome };
    return null;
  }

  // The task whose work ended and whose ack never got an answer, with its outcome: the same lease
  // handed back is acked with it (worked again, its side effects were made twice; rpc.py
  // Worker._serve).
  let resultInHand = null;
  // The task whose give-back (`fail`) got no answer, and that fail (sendFail): the same lease
  // handed back (the fail did not apply) has its fail sent again. Its handler run again at once
  // instead skipped the fail's backoff, and a task failing every time was never parked (rpc.py
  // Worker._fail_in_hand).
  let failInHand = null;
  let handedBack = false; // the task just served was such a lease handed back: not counted again

  // A fetch that got no answer (given up at the stop, timed out, its connection lost once sent)
  // may still claim a task for us at a bridge until its deadline (performance.now(), ms): its
  // reply goes nowhere, and only a fetch without `fresh` (the bridge reads our pointer) gets that
  // task back. Until then we do not know that we hold nothing.
  let unsureUntil = 0;
  const unsure = () => performance.now() < unsureUntil;
  // Such a fetch may also have claimed already, its reply lost: until a fetch is answered, the
  // stop asks the bridge what we hold, past that deadline too (rpc.py _claim_unanswered).
  let claimUnanswered = false;
  // Set with them: our pointer at the bridge may name a task such a fetch claimed after our next
  // fetch read it. Past the deadline the first fetch goes without `fresh` (the bridge reads the
  // pointer), and `fresh` comes back once one sent past it is answered. Said again as soon as a
  // fetch sent before the deadline was answered after it, the bridge skipped the pointer, and
  // the task waited out its whole lease (rpc.py _pointer_unread).
  let pointerUnread = false;

  /**
   * Note a fetch that failed: whether it may still claim a task for us at a bridge, until its
   * deadline (rpc.py _claiming_call).
   */
  function mayStillClaim(err, sentAt, timeoutMs) {
    // Answered (an error reply), or never taken (not published, closed while connecting, refused
    // by RabbitMQ): it cannot claim anything. Otherwise its deadline is its x-deadline, timeoutMs
    // from when it was sent, plus a second for the two hosts' clocks.
    if (err.reply !== undefined || err.sent === false) return false;
    if (!['timeout', 'connection_lost', 'closed'].includes(err.code)) return false;
    unsureUntil = Math.max(unsureUntil, sentAt + timeoutMs + 1_000);
    claimUnanswered = pointerUnread = true;
    return true;
  }

  /** A fetch (`body`) sent at `sentAt` was answered, with a task or none (rpc.py _claiming_call). */
  function fetchAnswered(body, sentAt) {
    claimUnanswered = false; // what we hold is known
    // Not `fresh`, and sent past every unanswered fetch's deadline: the bridge read our pointer.
    if (!body.fresh && sentAt >= unsureUntil) pointerUnread = false;
  }

  /**
   * Handle a task and ack it (or give it back when the work failed). Whether the bridge answered
   * about it (true: we hold nothing now), or null when the stop cut the work short (given back).
   */
  async function serve(task, value) {
    emit('task', { taskId: task.id, epoch: task.epoch, deliveries: task.deliveries, hasToken: task.hasToken, value });
    // Either is forgotten here: a lease handed back after another task is no longer ours.
    const held = resultInHand;
    const failing = failInHand;
    resultInHand = failInHand = null;
    if (held !== null && held.id === task.id && held.epoch === task.epoch && task.epoch != null) {
      emit('result_in_hand', { taskId: task.id, epoch: task.epoch });
      phase = 'acking';
      const completed = await ackTask(task, held.outcome);
      phase = 'idle';
      handedBack = true; // counted when its work ran (rpc.py: not counted again)
      return completed !== null;
    }
    if (failing !== null && failing.id === task.id && failing.epoch === task.epoch) {
      // Its fail did not apply: sent again, the task comes back after the fail's backoff.
      emit('fail_in_hand', { taskId: task.id, epoch: task.epoch, resent: failing.resent + 1 });
      const answered = await sendFail(task, [failing.error], failing.retryInMs, failing.resent + 1);
      handedBack = true; // counted when its work ran
      return answered !== null;
    }
    phase = 'working';
    let outcome;
    try {
      outcome = await handle(value, workMs, stopTimeoutMs);
    } catch (err) {
      // The work failed: give the task back, to come again after the bridge's backoff. Whatever
      // it threw: `reject()`, `throw null` have no name to read (reading it threw here, and the
      // worker exited with the task leased), a string no message.
      const error = err instanceof Error ? err : new Error(String(err));
      return (await giveBack(task, error.name || 'Error', error.message)) !== null;
    } finally {
      phase = 'idle';
    }
    if (outcome === CUT) {
      // Told to stop, and the work did not end in time: give the task back to come again at
      // once (another worker takes it), instead of leaving it leased to a stopped worker.
      cutHandler = true;
      await giveBack(task, 'StopTimeout', 'cancelled at the worker stop', 0);
      return null;
    }
    phase = 'acking';
    const completed = await ackTask(task, outcome);
    phase = 'idle';
    return completed !== null; // answered, true or false: we hold nothing now
  }

  /**
   * At the end: the task a fetch without an answer may still have claimed for us (see the top of
   * this file), asked for until its deadline, QB_STOP_GRACE_MS at most, and handled; past that
   * deadline too while such a fetch may have claimed a task nothing read since (RabbitMQ away
   * meanwhile: the loop's fetches never reached a bridge), until an answer says what we hold, at
   * least once (rpc.py _claimed_after_stop asks once; here again after no answer, within the
   * grace). Bounded: no request starts after the grace; one under way then is awaited (10 s at
   * most each, an extend and the fetch it calls for), plus the handling of what it hands back.
   */
  async function drain() {
    if (!unsure() && !claimUnanswered && !pointerUnread) return;
    // Closed first (the signal may have started it): a long-poll of ours waiting at a bridge then
    // claims nothing more (the bridge checks its reply-to before a claim). What is left: a claim
    // already past that check, or made by a fetch still queued at a busy bridge.
    await closing;
    await client.close();
    const graceEnd = performance.now() + stopGraceMs;
    const until = Math.min(unsureUntil, graceEnd);
    const askUntil = () => (claimUnanswered || pointerUnread ? graceEnd : until);
    emit('draining', { forMs: Math.max(0, Math.round(askUntil() - performance.now())) });
    const named = { serviceId, workerId, timeToRecover }; // no taskId: what the bridge says we hold
    let tasks = 0;
    let failed = 0;
    let lost = false; // a fetch of our own here got no answer
    let asked = false;
    while (!asked || performance.now() < askUntil()) {
      asked = true;
      let reply = null;
      try {
        // Never a fetch to ask: with nothing held it would claim the queue's next task.
        const askedAt = performance.now();
        const held = await client.request('extend', named);
        if (held.body.result !== true && askedAt >= unsureUntil) {
          // Our pointer read past every deadline, naming nothing: no claim of a lost fetch is left.
          claimUnanswered = pointerUnread = false;
        } else if (held.body.result === true) {
          const sentAt = performance.now();
          try {
            reply = await client.request('fetch', named); // not `fresh`, not waiting: the task held
          } catch (err) {
            if (mayStillClaim(err, sentAt, 10_000)) lost = true;
            throw err;
          }
          fetchAnswered(named, sentAt);
        }
      } catch (err) {
        if (MISCONFIGURED.has(err.code)) {
          // No request of this worker can succeed: nothing to hand back.
          emit('drain_failed', { code: err.code, message: String(err.message), pauseMs: null });
          break;
        }
        if (err.code !== 'integrity_error') {
          // No answer, unavailable, ...: paused as the loop's fetches are, never past the grace.
          failed += 1;
          const pauseMs = Math.max(0, Math.min(askUntil() - performance.now(), backoffMs(failed, basePauseMs)));
          emit('drain_failed', { code: err.code ?? null, message: String(err.message), pauseMs });
          await sleep(pauseMs);
          continue;
        }
        // integrity_error: the bridge dead-lettered the task it could not open; ask again.
        emit('drain_failed', { code: err.code, message: String(err.message), pauseMs: 0 });
      }
      failed = 0;
      if (reply !== null && reply.body.task !== undefined) {
        tasks += 1;
        await serve(reply.body.task, reply.body.result);
      } else {
        await sleep(Math.max(0, Math.min(askUntil() - performance.now(), STOP_ASK_EVERY_MS)));
      }
    }
    // `unsure`: a fetch of the drain itself got no answer; what it may claim returns when its
    // lease runs out.
    emit('drained', { tasks, unsure: lost });
  }

  let done = 0;
  let idle = 0;
  let failed = 0; // fetches in a row that failed: their pause grows
  // `fresh` (1.3): we know we hold no task (our last fetch answered none, or our last ack was
  // answered), and no fetch without an answer may still claim one for us, nor has one claimed
  // a task our pointer names unread (pointerUnread). Never after a request that failed: then we
  // may still hold one.
  let fresh = false;
  try {
    while (!stopping && (maxTasks === 0 || done < maxTasks)) {
      const fetch = { serviceId, workerId, timeToRecover, waitMs };
      if (fresh && !pointerUnread) fetch.fresh = true;
      fresh = false; // until this fetch is answered
      let reply;
      phase = 'fetching';
      // The reply may take waitMs: wait longer than that (x-deadline follows the timeout).
      const timeoutMs = waitMs + 10_000;
      const sentAt = performance.now();
      try {
        reply = await client.request('fetch', fetch, { timeoutMs });
      } catch (err) {
        mayStillClaim(err, sentAt, timeoutMs);
        if (stopping) break; // the signal closed the connection under the long-poll (see drain)
        if (MISCONFIGURED.has(err.code)) throw err; // this worker cannot be served: say so and stop
        if (err.code === 'integrity_error') {
          // A task failed authentication (tampered): the bridge dead-lettered it and cleared our
          // pointer, so the next fetch moves on at once. (One whose key is gone for now is let go
          // by the bridge, which hands out the next task, or answers unavailable.)
          emit('fetch_failed', { code: err.code, message: String(err.message), pauseMs: 0 });
          failed = 0;
          continue;
        }
        // No reply, the connection lost, RabbitMQ out of reach, unavailable, internal, a code we
        // do not know: none is this worker's fault, so pause (longer each time) and fetch again.
        failed += 1;
        const pauseMs = backoffMs(failed, basePauseMs);
        emit('fetch_failed', { code: err.code ?? null, message: String(err.message), pauseMs });
        await pause(pauseMs);
        continue;
      } finally {
        phase = 'idle';
      }
      failed = 0;
      fetchAnswered(fetch, sentAt);
      // A task's value may itself be null: test for `task`, not for `result`.
      if (reply.body.task === undefined) {
        fresh = !unsure();
        idle += 1;
        if (idleExit > 0 && idle >= idleExit) break;
        // Not long-polling, or a long-poll answered empty well before its wait (a bridge with
        // BRIDGE_HINTS=false does not long-poll: it answers at once): do not ask again at once.
        if (waitMs === 0 || performance.now() - sentAt < waitMs / 2) await pause(basePauseMs);
        continue;
      }
      idle = 0;
      const answered = await serve(reply.body.task, reply.body.result);
      if (answered === null) break; // the stop cut its work short: given back
      fresh = answered && !unsure();
      if (handedBack) handedBack = false;
      else done += 1;
    }
    await drain();
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

"""Every CQL statement of the bridge, by name, prepared once at start (``CassandraTaskStore.prepare``).

Statement names are listed in ``docs/storage.md`` with their round-trip cost. ``{ks}`` is the
keyspace (restricted by the settings to an identifier).
"""

from __future__ import annotations

LEASE_COLS_BRIEF = (
    "state, epoch, worker, lease_until, claim_id, completion_id, has_token, base_epoch, parked_at, park_reason, "
    "completed_at, uncounted, uncounted_epoch, key_missing, key_missing_since, key_missing_mark, "
    "park_id, park_ids, expires_at"
)
# Every write of a lease gives its cells the rest of the TASK's life (``expires_at``, recorded by the
# claim that read it from the task's row), not the rest of the writing bridge's own TTL. A writer
# that does not know it (an ack reads nothing first) binds its own computation and sends it along
# in this condition: refused for a lease that records another, it is sent again with that one
# (``CassandraTaskStore._lease_write``); a lease written without one (an older bridge) accepts it.
SAME_LIFE = "expires_at IN (?, null)"  # spelled out in each statement (an f-string is SQL built at run time to bandit)
# With the last fail's error (up to a value's size): read one lease at a time, or by ``lease.errors``.
LEASE_COLS = f"{LEASE_COLS_BRIEF}, error_key, error_nonce, error_ct"

STATEMENTS: dict[str, tuple[str, bool]] = {
    # name: (cql, idempotent). LWTs are not idempotent: their outcome is resolved by reading.
    "ready.insert": (
        "INSERT INTO {ks}.ready (owner, service, lane, bucket, seq, task_id, key_id, value_nonce, value_ct, "
        "token_nonce, token_ct, traceparent, created_at, max_deliveries, priority, expires_at) "
        "VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?",
        True,
    ),
    # A second entry of a stored task, at a later place in its lane (``TaskStore.enter_again``):
    # what a scan reads (``ready.scan``), not the value (read from the task's own row).
    "ready.enter_again": (
        "INSERT INTO {ks}.ready (owner, service, lane, bucket, seq, task_id, token_nonce, created_at, "
        "max_deliveries, priority, expires_at) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?",
        True,
    ),
    "ready.insert_recovered": (
        "INSERT INTO {ks}.ready (owner, service, lane, bucket, seq, task_id, epoch, token_nonce) "
        "VALUES (?, ?, 0, ?, ?, ?, ?, ?) USING TTL ?",
        True,
    ),
    "ready.scan": (
        "SELECT seq, task_id, epoch, token_nonce, claimed, created_at, expires_at FROM {ks}.ready "
        "WHERE owner = ? AND service = ? AND lane = ? AND bucket = ? AND seq > ? LIMIT ?",
        True,
    ),
    "ready.payload": (
        "SELECT key_id, value_nonce, value_ct, token_nonce, token_ct, traceparent, created_at, max_deliveries, "
        "priority, expires_at, TTL(value_ct) AS value_ttl FROM {ks}.ready "
        "WHERE owner = ? AND service = ? AND lane = 1 AND bucket = ? AND seq = ?",
        True,
    ),
    # An operator's look at a task: its row's small cells, never the value's or the token's ciphertext.
    "ready.about": (
        "SELECT value_nonce, token_nonce, created_at, max_deliveries, priority FROM {ks}.ready "
        "WHERE owner = ? AND service = ? AND lane = 1 AND bucket = ? AND seq = ?",
        True,
    ),
    "ready.options": (
        "SELECT max_deliveries, priority FROM {ks}.ready "
        "WHERE owner = ? AND service = ? AND lane = 1 AND bucket = ? AND seq = ?",
        True,
    ),
    "ready.stored_many": (
        "SELECT seq FROM {ks}.ready WHERE owner = ? AND service = ? AND lane = 1 AND bucket = ? AND seq IN ?",
        True,
    ),
    "ready.mark_claimed": (
        "UPDATE {ks}.ready USING TTL ? SET claimed = true "
        "WHERE owner = ? AND service = ? AND lane = ? AND bucket = ? AND seq = ?",
        True,
    ),
    # The row lives while any element of ``ends`` does (each element is a cell with its own TTL,
    # named by the end it was given): bridges of different BRIDGE_TASK_TTLs keep it for their own
    # entries. An INSERT's row marker took the TTL of the last write, and a bridge on a shorter
    # TTL cut the row's life under a longer-TTL bridge's tasks (a setting changed pod by pod).
    "buckets.insert": (
        "UPDATE {ks}.ready_buckets USING TTL ? SET ends = ends + ? WHERE owner = ? AND service = ? "
        "AND lane = ? AND bucket = ?",
        True,
    ),
    "buckets.from": (
        "SELECT bucket FROM {ks}.ready_buckets WHERE owner = ? AND service = ? AND lane = ? AND bucket >= ? LIMIT ?",
        True,
    ),
    "cursor.get": (
        "SELECT bucket, seq FROM {ks}.cursors WHERE owner = ? AND service = ? AND lane = ? LIMIT 1",
        True,
    ),
    "cursor.advance": (
        "INSERT INTO {ks}.cursors (owner, service, lane, bucket, seq) VALUES (?, ?, ?, ?, ?) USING TTL ?",
        True,
    ),
    # The rows behind a position (never read again): a range tombstone, behind the partition's head.
    "cursor.trim": ("DELETE FROM {ks}.cursors WHERE owner = ? AND service = ? AND lane = ? AND bucket < ?", True),
    # The ids of the decisions a lease recorded (a completion, parks), whatever else of it is left:
    # the cells of a decision that may owe the engine a result outlive the task by a day
    # (RESULT_OWED_MS), the rest of the lease (its epoch) ends with the task.
    "lease.decisions": (
        "SELECT completion_id, park_id, park_ids FROM {ks}.leases WHERE owner = ? AND service = ? AND task_id = ?",
        True,
    ),
    "lease.get": (
        f"SELECT {LEASE_COLS} FROM {{ks}}.leases WHERE owner = ? AND service = ? AND task_id = ?",  # nosec B608
        True,
    ),
    # The recovery scheduler's read of many leases of one queue at once (the deadlines of a bucket):
    # one request instead of one per deadline; the coordinator reads the partitions. Without the
    # last errors: 50 of them could be 50 MiB.
    "lease.get_many": (
        f"SELECT task_id, {LEASE_COLS_BRIEF} FROM {{ks}}.leases "  # nosec B608
        "WHERE owner = ? AND service = ? AND task_id IN ?",
        True,
    ),
    # The last errors of a few tasks (the parked listing, within its budget).
    "lease.errors": (
        "SELECT task_id, error_key, error_nonce, error_ct FROM {ks}.leases "
        "WHERE owner = ? AND service = ? AND task_id IN ?",
        True,
    ),
    "lease.claim_new": (
        "INSERT INTO {ks}.leases (owner, service, task_id, state, epoch, worker, lease_until, claim_id, has_token, "
        "expires_at) VALUES (?, ?, ?, 'leased', 1, ?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?",
        False,
    ),
    "lease.claim_expired": (
        "UPDATE {ks}.leases USING TTL ? SET epoch = ?, worker = ?, lease_until = ?, claim_id = ?, has_token = ?, "
        "expires_at = ? WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND lease_until <= ? AND expires_at IN (?, null)",
        False,
    ),
    # The holder may extend even past its deadline as long as nobody re-claimed the task (the
    # epoch is unchanged): it was never anyone else's in between. Only to a later deadline (or the
    # same): the timer wheel holds the lease's own deadline, which is met first. A shorter lease is
    # refused (reporting the deadline it has), and its deadline filed before `lease.shorten`.
    "lease.extend": (
        "UPDATE {ks}.leases USING TTL ? SET lease_until = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND worker = ? AND lease_until <= ? AND expires_at IN (?, null)",
        False,
    ),
    # An extend to an earlier deadline (a shorter timeToRecover), once that deadline is filed; only
    # from the deadline it was decided on (a later one since is another copy's: not undone).
    "lease.shorten": (
        "UPDATE {ks}.leases USING TTL ? SET lease_until = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND worker = ? AND lease_until = ? AND expires_at IN (?, null)",
        False,
    ),
    # The same, for a task known (from its lease) to carry no token: an ack that names its task
    # tries this first and needs no read before it (a task with a token, or a lease written before
    # 1.3, fails the condition and takes the general path).
    "lease.complete_tokenless": (
        "UPDATE {ks}.leases USING TTL ? SET state = 'done', completed_at = ?, completion_id = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND worker = ? AND has_token = false AND expires_at IN (?, null)",
        False,
    ),
    "lease.kill": (
        "UPDATE {ks}.leases USING TTL ? SET state = 'dead', completed_at = ?, completion_id = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND worker = ? AND expires_at IN (?, null)",
        False,
    ),
    "lease.complete": (
        "UPDATE {ks}.leases USING TTL ? SET state = 'done', completed_at = ?, completion_id = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND worker = ? AND expires_at IN (?, null)",
        False,
    ),
    # -- 1.4, the worker lifecycle (rare paths: a failure, a parked task, an operator) --------------
    # A claim that found its task's key missing: not a delivery (the worker never saw the task),
    # so it does not count toward the delivery limit. Only the holder writes it, once per epoch.
    # Only at the deadline the claim wrote: another copy of the fetch that resent the task to its
    # worker (a new deadline) made it a delivery. The lease is held by nobody from then on (its
    # deadline kept): a later fetch of its worker on a bridge with the key resent it, a delivery
    # left uncounted that did not end the run of claims that found the key missing (a re-review).
    "lease.uncount": (
        "UPDATE {ks}.leases USING TTL ? SET uncounted = ?, uncounted_epoch = ?, key_missing = ?, "
        "key_missing_since = ?, key_missing_mark = ?, worker = '' "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND worker = ? AND lease_until = ? AND expires_at IN (?, null)",
        False,
    ),
    # ``lease.uncount`` that also moves the deadline (held by nobody until ``lease_until``): a claim
    # whose task could not be opened, let go to come back soon, not at its worker's deadline.
    "lease.let_go": (
        "UPDATE {ks}.leases USING TTL ? SET uncounted = ?, uncounted_epoch = ?, key_missing = ?, "
        "key_missing_since = ?, key_missing_mark = ?, lease_until = ?, worker = '' "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND worker = ? AND lease_until = ? AND expires_at IN (?, null)",
        False,
    ),
    "lease.release": (
        "UPDATE {ks}.leases USING TTL ? SET lease_until = ?, worker = '', error_key = ?, error_nonce = ?, "
        "error_ct = ? WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND worker = ? AND expires_at IN (?, null)",
        False,
    ),
    # A park adds its id to `park_ids` (the set of every park of the task, each element living as
    # long as the task) and still writes `park_id` (the last park), which bridges before it read.
    "lease.park_held": (
        "UPDATE {ks}.leases USING TTL ? SET state = 'parked', parked_at = ?, park_reason = ?, completion_id = ?, "
        "park_id = ?, park_ids = park_ids + ?, error_key = ?, error_nonce = ?, error_ct = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND worker = ? AND expires_at IN (?, null)",
        False,
    ),
    # ``lease.park_held`` of a claim whose task's key is missing (``lease.let_go``'s place, once such
    # claims in a row have lasted BRIDGE_KEY_MISSING_PARK_AFTER_SECONDS): only at the deadline the
    # claim wrote, as a let-go (another copy of the fetch that resent the task to its worker since
    # made it a delivery).
    "lease.park_unopened": (
        "UPDATE {ks}.leases USING TTL ? SET state = 'parked', parked_at = ?, park_reason = ?, completion_id = ?, "
        "park_id = ?, park_ids = park_ids + ?, error_key = ?, error_nonce = ?, error_ct = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND worker = ? AND lease_until = ? AND expires_at IN (?, null)",
        False,
    ),
    # `base_epoch` as the scheduler read it (null: never redriven, read as 0): a redrive since
    # leaves the lease leased at the same epoch and expired, but moves `base_epoch` to that epoch
    # (the park's read had it lower: the lease was at its limit), so a park decided before it is
    # refused instead of parking the task the operator just put back.
    "lease.park_expired": (
        "UPDATE {ks}.leases USING TTL ? SET state = 'parked', parked_at = ?, park_reason = ?, completion_id = ?, "
        "park_id = ?, park_ids = park_ids + ? WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND lease_until <= ? AND base_epoch IN (?, null) "
        "AND expires_at IN (?, null)",
        False,
    ),
    "lease.unpark": (
        "UPDATE {ks}.leases USING TTL ? SET state = 'leased', base_epoch = ?, uncounted = 0, key_missing = 0, "
        "worker = '', "
        "lease_until = ?, claim_id = ?, park_ids = park_ids + ? WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'parked' AND epoch = ? AND expires_at IN (?, null)",
        False,
    ),
    "lease.cancel_new": (
        "INSERT INTO {ks}.leases (owner, service, task_id, state, epoch, completed_at, completion_id, expires_at) "
        "VALUES (?, ?, ?, 'cancelled', 0, ?, ?, ?) IF NOT EXISTS USING TTL ?",
        False,
    ),
    # Both with `base_epoch` as the caller read it (as `lease.park_expired`): a park and a redrive
    # since leave the lease in the same state at the same epoch, but redriven (counted ready, not
    # in flight: the caller's counts would be off).
    "lease.cancel": (
        "UPDATE {ks}.leases USING TTL ? SET state = ?, completed_at = ?, completion_id = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = ? AND epoch = ? AND base_epoch IN (?, null) AND expires_at IN (?, null)",
        False,
    ),
    "lease.cancel_expired": (
        "UPDATE {ks}.leases USING TTL ? SET state = 'cancelled', completed_at = ?, completion_id = ? "
        "WHERE owner = ? AND service = ? AND task_id = ? "
        "IF state = 'leased' AND epoch = ? AND lease_until <= ? AND base_epoch IN (?, null) "
        "AND expires_at IN (?, null)",
        False,
    ),
    "parked.insert": (
        "INSERT INTO {ks}.parked (owner, service, task_id, epoch, parked_at, reason, has_token, park_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?",
        True,
    ),
    "parked.delete": ("DELETE FROM {ks}.parked WHERE owner = ? AND service = ? AND task_id = ?", True),
    # A row whose park is over (a listing's clean-up) goes only while it is of that park's epoch:
    # a later park, at a later epoch, keeps its row.
    "parked.delete_if_epoch": (
        "DELETE FROM {ks}.parked WHERE owner = ? AND service = ? AND task_id = ? IF epoch = ?",
        False,
    ),
    # A park whose compare-and-set was refused takes back its own row, not a later park's: not by
    # epoch, which another park can share (a scheduler's park refused by a late extend, then the
    # worker's `fail` parking at the same epoch), but by the park's own id.
    "parked.delete_if_park": (
        "DELETE FROM {ks}.parked WHERE owner = ? AND service = ? AND task_id = ? IF park_id = ?",
        False,
    ),
    "parked.list": (
        "SELECT task_id, epoch, parked_at, reason, has_token, park_id FROM {ks}.parked "
        "WHERE owner = ? AND service = ? LIMIT ?",
        True,
    ),
    # The next page, past rows already read (a listing goes on past rows whose park is over).
    "parked.list_after": (
        "SELECT task_id, epoch, parked_at, reason, has_token, park_id FROM {ks}.parked "
        "WHERE owner = ? AND service = ? AND task_id > ? LIMIT ?",
        True,
    ),
    # One row per park (see schema.py): stamped with the park's own time, and its delete after it,
    # so the delete wins whichever bridge's clock sends it. Nothing else writes the row.
    "parks.insert": (
        "INSERT INTO {ks}.parks (owner, service, task_id, park_id, epoch, parked_at, reason, has_token) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?",
        True,
    ),
    "parks.delete": (
        "DELETE FROM {ks}.parks USING TIMESTAMP ? WHERE owner = ? AND service = ? AND task_id = ? AND park_id = ?",
        True,
    ),
    "parks.list": (
        "SELECT task_id, park_id, epoch, parked_at, reason, has_token FROM {ks}.parks "
        "WHERE owner = ? AND service = ? LIMIT ?",
        True,
    ),
    "parks.list_after": (
        "SELECT task_id, park_id, epoch, parked_at, reason, has_token FROM {ks}.parks "
        "WHERE owner = ? AND service = ? AND task_id > ? LIMIT ?",
        True,
    ),
    # Counter updates are not idempotent: a timed-out one is not retried (a count may then be off
    # by that delta; the counts are for operators, see docs/storage.md).
    "counts.add": (
        "UPDATE {ks}.queue_counts SET ready = ready + ?, in_flight = in_flight + ? "
        "WHERE owner = ? AND service = ? AND day = ?",
        False,
    ),
    "counts.get": (
        "SELECT ready, in_flight FROM {ks}.queue_counts WHERE owner = ? AND service = ? AND day >= ?",
        True,
    ),
    "delayed.add": (
        "UPDATE {ks}.delayed_counts SET delayed = delayed + ? WHERE owner = ? AND service = ? AND minute = ?",
        False,
    ),
    "delayed.get": (
        "SELECT minute, delayed FROM {ks}.delayed_counts WHERE owner = ? AND service = ? AND minute >= ?",
        True,
    ),
    # Counter tables cannot carry a TTL: rows past every reader's window are deleted by the duty
    # holder a few times a day (bridge.domain.housekeeping), a range tombstone per partition.
    "counts.trim": ("DELETE FROM {ks}.queue_counts WHERE owner = ? AND service = ? AND day < ?", True),
    "delayed.trim": ("DELETE FROM {ks}.delayed_counts WHERE owner = ? AND service = ? AND minute < ?", True),
    "services.insert": ("INSERT INTO {ks}.services (owner, service) VALUES (?, ?) USING TTL ?", True),
    "services.of": ("SELECT service FROM {ks}.services WHERE owner = ? LIMIT ?", True),
    "services.all": ("SELECT owner, service FROM {ks}.services LIMIT ?", True),
    # The counter trim's walk, a page at a time (a tenant naming a new service per add registers a
    # million in days: read at once, the duty holder held them all in memory).
    "services.rest_of_owner": (
        "SELECT owner, service FROM {ks}.services WHERE owner = ? AND service > ? LIMIT ?",
        True,
    ),
    "services.after_owner": ("SELECT owner, service FROM {ks}.services WHERE token(owner) > token(?) LIMIT ?", True),
    # The worker pointer decides what a fetch re-sends and what a legacy ack completes, so it must
    # not be lost to last-write-wins between hosts whose clocks differ: every write carries an
    # explicit timestamp greater than the stamp it read (see ``next_stamp``), and it is never
    # deleted (a tombstone's stamp could not be read back), only nulled.
    "worker.get": (
        "SELECT task_id, epoch, has_token, done_task, stamp, granted_at FROM {ks}.workers "
        "WHERE owner = ? AND service = ? AND worker = ?",
        True,
    ),
    "worker.set": (
        "UPDATE {ks}.workers USING TTL ? AND TIMESTAMP ? SET task_id = ?, epoch = ?, has_token = ?, "
        "stamp = ?, granted_at = ? WHERE owner = ? AND service = ? AND worker = ?",
        True,
    ),
    "worker.finish": (
        "UPDATE {ks}.workers USING TTL ? AND TIMESTAMP ? SET done_task = ? "
        "WHERE owner = ? AND service = ? AND worker = ?",
        True,
    ),
    "worker.clear": (
        "UPDATE {ks}.workers USING TIMESTAMP ? SET task_id = null, epoch = null, has_token = null, "
        "granted_at = null, stamp = ? WHERE owner = ? AND service = ? AND worker = ?",
        True,
    ),
    "clock.now": ("SELECT toUnixTimestamp(now()) AS now_ms FROM system.local", True),
    "expiry.insert": (
        "INSERT INTO {ks}.expiry_shards (bucket, shard, lease_until, owner, service, task_id, epoch, has_token, "
        "priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?",
        True,
    ),
    "expiry.mark": ("INSERT INTO {ks}.expiry_marks (hour, bucket) VALUES (?, ?) USING TTL ?", True),
    "expiry.marks": (
        "SELECT bucket FROM {ks}.expiry_marks WHERE hour = ? AND bucket >= ? AND bucket <= ?",
        True,
    ),
    # Every shard of a bucket in one request (IN on the partition key: the coordinator reads the
    # shards; spreading the writes costs the client no extra request).
    "expiry.bucket": (
        "SELECT lease_until, owner, service, task_id, epoch, has_token, priority FROM {ks}.expiry_shards "
        "WHERE bucket = ? AND shard IN ?",
        True,
    ),
    # The unsharded tables of bridges before 1.3, read only during a rolling upgrade.
    "expiry.unsharded_bucket": (
        "SELECT lease_until, owner, service, task_id, epoch, has_token FROM {ks}.expiries WHERE bucket = ?",
        True,
    ),
    "outbox.insert": (
        "INSERT INTO {ks}.outbox_shards (bucket, shard, owner, service, task_id, completion_id, key_id, "
        "result_nonce, result_ct, published) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, false) USING TTL ?",
        True,
    ),
    # A copy of the task's sealed token (and trace context) for a result whose publish failed: the
    # task's row holding them ends with the task, and the result may be owed past that.
    # The result's cells written again with the token's, under one TTL: given the token's alone, a
    # row whose result cells ended first lived on as a token with no result (its key id null: read
    # as the owner's current key, the engine was sent an integrity_error; found by review).
    "outbox.keep_token": (
        "UPDATE {ks}.outbox_shards USING TTL ? SET token_key = ?, token_nonce = ?, token_ct = ?, traceparent = ?, "
        "key_id = ?, result_nonce = ?, result_ct = ? "
        "WHERE bucket = ? AND shard = ? AND owner = ? AND service = ? AND task_id = ? AND completion_id = ?",
        True,
    ),
    "outbox.mark_published": (
        "UPDATE {ks}.outbox_shards USING TTL ? SET published = true "
        "WHERE bucket = ? AND shard = ? AND owner = ? AND service = ? AND task_id = ? AND completion_id = ?",
        True,
    ),
    # The relay's sweep of a bucket: which entries are still unpublished, without their results
    # (each up to a value's size, and nearly all of them published long ago); then those few whole.
    "outbox.bucket": (
        "SELECT owner, service, task_id, completion_id, published FROM {ks}.outbox_shards "
        "WHERE bucket = ? AND shard IN ?",
        True,
    ),
    "outbox.get": (
        "SELECT bucket, owner, service, task_id, completion_id, key_id, result_nonce, result_ct, published, "
        "token_key, token_nonce, token_ct, traceparent FROM {ks}.outbox_shards "
        "WHERE bucket = ? AND shard = ? AND owner = ? AND service = ? AND task_id = ? AND completion_id = ?",
        True,
    ),
    "outbox.unsharded_mark_published": (
        "UPDATE {ks}.outbox USING TTL ? SET published = true "
        "WHERE bucket = ? AND owner = ? AND service = ? AND task_id = ? AND completion_id = ?",
        True,
    ),
    "outbox.unsharded_bucket": (
        "SELECT owner, service, task_id, completion_id, published FROM {ks}.outbox WHERE bucket = ?",
        True,
    ),
    "outbox.unsharded_get": (
        "SELECT bucket, owner, service, task_id, completion_id, key_id, result_nonce, result_ct, published "
        "FROM {ks}.outbox WHERE bucket = ? AND owner = ? AND service = ? AND task_id = ? AND completion_id = ?",
        True,
    ),
    "sched.get": ("SELECT pos FROM {ks}.scheduler_progress WHERE name = ? AND day = ? LIMIT 1", True),
    "sched.advance": ("INSERT INTO {ks}.scheduler_progress (name, day, pos) VALUES (?, ?, ?) USING TTL ?", True),
    # Outbox buckets still owing a publish, kept apart from the relay's position (``<name>.owed``):
    # a result nobody can take no longer holds the position back for the rest of its life.
    "sched.list": ("SELECT pos FROM {ks}.scheduler_progress WHERE name = ? AND day = ?", True),
    "sched.forget": ("DELETE FROM {ks}.scheduler_progress WHERE name = ? AND day = ? AND pos = ?", True),
    "sched.legacy_get": ("SELECT pos FROM {ks}.scheduler_cursors WHERE name = ? LIMIT 1", True),
    "idem.insert": (
        "INSERT INTO {ks}.idempotency (owner, service, message_id, task_id) VALUES (?, ?, ?, ?) "
        "IF NOT EXISTS USING TTL ?",
        False,
    ),
    "idem.record": (
        "INSERT INTO {ks}.idempotency (owner, service, message_id, task_id) VALUES (?, ?, ?, ?) USING TTL ?",
        True,
    ),
    "idem.replace": (
        "UPDATE {ks}.idempotency USING TTL ? SET task_id = ? "
        "WHERE owner = ? AND service = ? AND message_id = ? IF task_id = ?",
        False,
    ),
    # When the record was written: a delayed task's id holds its due time, not its add's.
    "idem.written": (
        "SELECT writetime(task_id) AS written FROM {ks}.idempotency WHERE owner = ? AND service = ? AND message_id = ?",
        True,
    ),
    "idem.get": (
        "SELECT task_id FROM {ks}.idempotency WHERE owner = ? AND service = ? AND message_id = ?",
        True,
    ),
    "ping": ("SELECT release_version FROM system.local", True),
}

# Inserts of new rows in the tables that scans read (a queue's `ready` entries, the scheduler's
# `expiry_shards` buckets) whose absent values (no token, no traceparent, the default priority or
# delivery limit) are sent unset, not null: a null is a cell tombstone, and every entry of a
# tokenless queue carried four, so each scan page read four tombstones a row (Cassandra warned of
# "1133 tombstone cells" for 283 rows; past tombstone_failure_threshold a read fails). Unset leaves
# the cell absent, which reads as null alike. Only where no earlier value could need clearing.
NULLS_UNSET = frozenset({"ready.insert", "ready.enter_again", "ready.insert_recovered", "expiry.insert"})

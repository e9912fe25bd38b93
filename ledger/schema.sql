-- The ledger's tables. Applied by PostgresLedger.create on every start, so every statement is
-- idempotent. Tables are prefixed ledger_ because the coordinator shares the database.
-- Amounts are micro-units in bigint; the constraints restate the ledger's invariants so that
-- no code path, and no operator with psql, can break them silently.

CREATE TABLE IF NOT EXISTS ledger_accounts (
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    owner text NOT NULL DEFAULT '',
    -- credits minus debits of every entry touching this account, kept in step by the writers
    balance bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_accounts_kind_owner_key UNIQUE (kind, owner),
    CONSTRAINT ledger_accounts_kind_known
        CHECK (kind IN ('issuance', 'escrow', 'fee', 'buyer', 'miner')),
    -- issuance, escrow and fee are singletons; buyers and miners are named by their owner
    CONSTRAINT ledger_accounts_owner_named
        CHECK ((kind IN ('issuance', 'escrow', 'fee')) = (owner = '')),
    -- only issuance, the source of all credits, may go negative
    CONSTRAINT ledger_accounts_balance_nonnegative CHECK (kind = 'issuance' OR balance >= 0)
);

CREATE TABLE IF NOT EXISTS ledger_holds (
    id bigserial PRIMARY KEY,
    buyer bigint NOT NULL REFERENCES ledger_accounts (id),
    amount bigint NOT NULL CHECK (amount > 0),
    status text NOT NULL DEFAULT 'open',
    -- the settlement, all zero while open: charged = miner_credit + fee, released = the rest
    charged bigint NOT NULL DEFAULT 0 CHECK (charged >= 0),
    miner_credit bigint NOT NULL DEFAULT 0 CHECK (miner_credit >= 0),
    fee bigint NOT NULL DEFAULT 0 CHECK (fee >= 0),
    released bigint NOT NULL DEFAULT 0 CHECK (released >= 0),
    miner bigint REFERENCES ledger_accounts (id),
    reference bytea NOT NULL,  -- the request the hold pays for
    settlement_reference bytea,  -- the job receipt hash, set by settle
    created_at timestamptz NOT NULL DEFAULT now(),
    closed_at timestamptz,
    -- the coordinator replica that placed it (coordinator/replicas/lease.py), whose death
    -- releases it; NULL: placed before holders existed, or by a caller outside a replica
    holder text,
    CONSTRAINT ledger_holds_status_known CHECK (status IN ('open', 'settled', 'released')),
    CONSTRAINT ledger_holds_closed_at CHECK ((status = 'open') = (closed_at IS NULL)),
    CONSTRAINT ledger_holds_settlement_adds_up CHECK (
        status = 'open'
        OR (charged = miner_credit + fee AND charged + released = amount)
    )
);

CREATE TABLE IF NOT EXISTS ledger_entries (
    -- the entry's index in the Merkle log: gap-free from 0 in commit order, because every writer
    -- appends under one advisory lock (ledger/batch.py)
    seq bigint PRIMARY KEY CHECK (seq >= 0),
    kind text NOT NULL,
    debit bigint NOT NULL REFERENCES ledger_accounts (id),
    credit bigint NOT NULL REFERENCES ledger_accounts (id),
    amount bigint NOT NULL CHECK (amount > 0),
    hold_id bigint REFERENCES ledger_holds (id),
    reference bytea,
    memo text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    -- the canonical bytes exactly as hashed (ledger/entry.py); the columns above are an index
    leaf bytea NOT NULL,
    leaf_hash bytea NOT NULL CHECK (length(leaf_hash) = 32),
    -- ledger_entries_kind_known (the kinds allowed) is added by the DO block below, so that a
    -- database created before a kind existed gets it too
    CONSTRAINT ledger_entries_two_sides CHECK (debit <> credit)
);

-- The entry kinds of ledger/entry.py's EntryKind. When a kind is added: list it here and make it
-- the marker below. The constraint is replaced only when it lacks the marker, because replacing
-- it re-checks every entry under an exclusive lock, which must not happen on every start.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'ledger_entries'::regclass
            AND conname = 'ledger_entries_kind_known'
            AND pg_get_constraintdef(oid) LIKE '%''reward''%'
    ) THEN
        ALTER TABLE ledger_entries DROP CONSTRAINT IF EXISTS ledger_entries_kind_known;
        ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_known CHECK (kind IN (
            'mint', 'hold', 'settle', 'fee', 'release', 'slash', 'refund', 'reward'
        ));
    END IF;
END
$$;

-- Every perfect subtree of the Merkle tree above the leaves, so that any inclusion or
-- consistency proof is a handful of lookups (level 0 is ledger_entries.leaf_hash).
CREATE TABLE IF NOT EXISTS ledger_tree (
    level smallint NOT NULL CHECK (level > 0),
    idx bigint NOT NULL CHECK (idx >= 0),
    hash bytea NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
);

-- Where the log ends: its size, the compact range of the tree, and the last leaf hash.
CREATE TABLE IF NOT EXISTS ledger_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    size bigint NOT NULL CHECK (size >= 0),
    frontier bytea NOT NULL,
    last_leaf_hash bytea NOT NULL CHECK (length(last_leaf_hash) = 32)
);

INSERT INTO ledger_head (size, frontier, last_leaf_hash)
VALUES (0, decode('010000000000000000', 'hex'), decode(repeat('00', 32), 'hex'))
ON CONFLICT (singleton) DO NOTHING;

-- The keys that have signed this log's checkpoints, newest last (for dumps and key rotation).
CREATE TABLE IF NOT EXISTS ledger_signers (
    verifier_key text PRIMARY KEY,
    origin text NOT NULL,
    first_used timestamptz NOT NULL DEFAULT now()
);

-- Signed checkpoints (C2SP signed notes), one per tree size at most.
CREATE TABLE IF NOT EXISTS ledger_checkpoints (
    size bigint PRIMARY KEY CHECK (size >= 0),
    root bytea NOT NULL CHECK (length(root) = 32),
    note bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The sequencer epoch (ledger/checkpointer.py): one row, bumped by every process when it becomes
-- the sequencer, after it took the sequencer lock. Every checkpoint write locks this row and
-- stores only if the epoch is still the writer's, so a deposed sequencer whose loop still runs
-- can never store a checkpoint once its successor took over. holder and backend_pid say who
-- holds the role (pg_terminate_backend(backend_pid) forces a takeover).
CREATE TABLE IF NOT EXISTS ledger_sequencer (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch bigint NOT NULL CHECK (epoch > 0),
    holder text NOT NULL,  -- host and pid of the sequencer's process
    backend_pid integer NOT NULL,  -- its lock connection's server process
    since timestamptz NOT NULL DEFAULT now()
);

-- The epoch each checkpoint was stored under; 0 for checkpoints stored before epochs existed,
-- and by a Checkpointer used without running() (tests, tools). Added where missing, once: an
-- ALTER TABLE on every start would lock the table against readers each time.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'ledger_checkpoints'::regclass AND attname = 'epoch' AND NOT attisdropped
    ) THEN
        ALTER TABLE ledger_checkpoints
            ADD COLUMN epoch bigint NOT NULL DEFAULT 0 CHECK (epoch >= 0);
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS ledger_entries_hold_id_idx ON ledger_entries (hold_id);
-- For unmatured credits (PostgresLedger.unmatured): a miner's recent credits and the slashes and
-- refunds taken from it. Partial, so holds, fees and releases cost these indexes nothing.
CREATE INDEX IF NOT EXISTS ledger_entries_credited_idx ON ledger_entries (credit, created_at)
    WHERE kind IN ('settle', 'reward');
CREATE INDEX IF NOT EXISTS ledger_entries_taken_idx ON ledger_entries (debit, created_at)
    WHERE kind IN ('slash', 'refund');
CREATE INDEX IF NOT EXISTS ledger_holds_open_idx ON ledger_holds (created_at) WHERE status = 'open';

-- Holds' holder, for databases created before it existed. Guarded rather than a bare
-- ADD COLUMN IF NOT EXISTS, which would take ledger_holds' exclusive lock on every start (and
-- stall the other replicas' writers for that moment) even when the column is there.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'ledger_holds'::regclass AND attname = 'holder' AND NOT attisdropped
    ) THEN
        ALTER TABLE ledger_holds ADD COLUMN IF NOT EXISTS holder text;
    END IF;
END
$$;

INSERT INTO ledger_accounts (kind, owner)
VALUES ('issuance', ''), ('escrow', ''), ('fee', '')
ON CONFLICT (kind, owner) DO NOTHING;

-- sqapi's core status schema (PostgreSQL).  One row per message, one per (message, plugin).
-- Statuses: VALIDATING, QUERYING, PROCESSING, DONE, RETRY, FAILED.
-- Run by Database.initialize_message_table(); safe to run again.

CREATE TABLE IF NOT EXISTS messages (
    uuid          TEXT PRIMARY KEY,
    data_location TEXT,
    meta_location TEXT,
    data_type     TEXT,
    hash_digest   TEXT,
    metadata      TEXT,          -- JSON: the metadata the last attempt used (fetched or in the message)
    trace_id      TEXT,          -- the OpenTelemetry trace of the last attempt (NULL when tracing is off)
    status        TEXT NOT NULL,
    info          TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- tables made before the metadata column existed
ALTER TABLE messages ADD COLUMN IF NOT EXISTS metadata TEXT;
-- tables made before the trace_id column existed
ALTER TABLE messages ADD COLUMN IF NOT EXISTS trace_id TEXT;

CREATE INDEX IF NOT EXISTS messages_status_updated_at ON messages (status, updated_at);
CREATE INDEX IF NOT EXISTS messages_updated_at ON messages (updated_at);

CREATE TABLE IF NOT EXISTS message_plugins (
    uuid        TEXT NOT NULL REFERENCES messages (uuid) ON DELETE CASCADE,
    plugin      TEXT NOT NULL,
    status      TEXT NOT NULL,
    info        TEXT,
    duration_ms DOUBLE PRECISION,
    result      TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (uuid, plugin)
);

CREATE INDEX IF NOT EXISTS message_plugins_plugin_status ON message_plugins (plugin, status);

-- the plugin's declared version (config.yml: plugin.version) that produced the row; NULL: it declares none
ALTER TABLE message_plugins ADD COLUMN IF NOT EXISTS version TEXT;

-- The history: one row per plugin outcome of every attempt (plugin set), and per attempt's outcome
-- (plugin NULL: DONE, RETRY or FAILED), written with the status rows above.  Oldest first: ORDER BY id.
-- Written on every message, so kept cheap: one btree (its key serves a message's history), no foreign key
-- (sqapi prune --messages removes a message's events with it).
CREATE TABLE IF NOT EXISTS message_events (
    id          BIGSERIAL NOT NULL,
    uuid        TEXT NOT NULL,
    attempt     INTEGER,           -- messages.attempts when it was written
    plugin      TEXT,              -- NULL: the message's own status
    status      TEXT NOT NULL,
    info        TEXT,
    duration_ms DOUBLE PRECISION,
    version     TEXT,              -- the plugin's version that ran
    loader      TEXT,              -- who wrote it: host:pid
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (uuid, id)
);

-- for sqapi prune: events arrive in time order, so a BRIN index (a few pages, next to nothing per insert) serves it
CREATE INDEX IF NOT EXISTS message_events_at ON message_events USING brin (at);

-- sqapi's core status schema, SQLite variant of scripts/init.sql (same tables and columns).
-- Times are ISO 8601 UTC text written by sqapi, so they sort as they read.

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
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS messages_status_updated_at ON messages (status, updated_at);
CREATE INDEX IF NOT EXISTS messages_updated_at ON messages (updated_at);

CREATE TABLE IF NOT EXISTS message_plugins (
    uuid        TEXT NOT NULL REFERENCES messages (uuid) ON DELETE CASCADE,
    plugin      TEXT NOT NULL,
    status      TEXT NOT NULL,
    info        TEXT,
    duration_ms REAL,
    result      TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    updated_at  TEXT NOT NULL,
    version     TEXT,          -- the plugin's declared version that produced the row
    PRIMARY KEY (uuid, plugin)
);

CREATE INDEX IF NOT EXISTS message_plugins_plugin_status ON message_plugins (plugin, status);

-- the history: every plugin outcome of every attempt, and each attempt's outcome (plugin NULL)
CREATE TABLE IF NOT EXISTS message_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid        TEXT NOT NULL,
    attempt     INTEGER,
    plugin      TEXT,
    status      TEXT NOT NULL,
    info        TEXT,
    duration_ms REAL,
    version     TEXT,
    loader      TEXT,
    at          TEXT NOT NULL
);

-- (uuid) alone: a SQLite index ends with the rowid (id), so it serves ORDER BY id too -- and (uuid, id) misleads
-- SQLite 3.40's row-value IN (sqapi prune's delete found nothing)
CREATE INDEX IF NOT EXISTS message_events_uuid ON message_events (uuid);
CREATE INDEX IF NOT EXISTS message_events_at ON message_events (at);

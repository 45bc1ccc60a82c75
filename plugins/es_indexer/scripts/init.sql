-- Which index each message's document went to: a redelivery or deletion on a later day
-- finds the same index even when the index name has a {date} in it.
CREATE TABLE IF NOT EXISTS es_documents (
    uuid_ref    TEXT PRIMARY KEY,
    index_name  TEXT NOT NULL,
    hash_digest TEXT,
    indexed_at  TEXT NOT NULL
);

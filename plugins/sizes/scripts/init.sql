CREATE TABLE IF NOT EXISTS sizes (
    uuid_ref      TEXT PRIMARY KEY,
    data_location TEXT,
    meta_location TEXT,
    metadata_size INTEGER NOT NULL,
    data_size     BIGINT NOT NULL,
    hash_digest   TEXT
);

CREATE INDEX IF NOT EXISTS sizes_data_size ON sizes (data_size);

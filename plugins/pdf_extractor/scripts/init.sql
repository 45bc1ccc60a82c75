CREATE TABLE IF NOT EXISTS pdf_texts (
    uuid_ref     TEXT PRIMARY KEY,
    hash_digest  TEXT,
    pages        INTEGER NOT NULL,
    chars        INTEGER NOT NULL,
    truncated    INTEGER NOT NULL,
    text         TEXT NOT NULL,
    extracted_at TEXT NOT NULL
);

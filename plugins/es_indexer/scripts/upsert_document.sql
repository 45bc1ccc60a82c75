INSERT INTO es_documents (uuid_ref, index_name, hash_digest, indexed_at)
VALUES (%(uuid_ref)s, %(index_name)s, %(hash_digest)s, %(indexed_at)s)
ON CONFLICT (uuid_ref) DO UPDATE SET
    index_name = excluded.index_name,
    hash_digest = excluded.hash_digest,
    indexed_at = excluded.indexed_at;

INSERT INTO sizes (uuid_ref, data_location, meta_location, metadata_size, data_size, hash_digest)
VALUES (%(uuid_ref)s, %(data_location)s, %(meta_location)s, %(metadata_size)s, %(data_size)s, %(hash_digest)s)
ON CONFLICT (uuid_ref) DO UPDATE SET
    data_location = excluded.data_location,
    meta_location = excluded.meta_location,
    metadata_size = excluded.metadata_size,
    data_size = excluded.data_size,
    hash_digest = excluded.hash_digest;

SELECT uuid_ref, data_location, meta_location, metadata_size, data_size, hash_digest
FROM sizes WHERE uuid_ref = %(uuid_ref)s;

SELECT uuid_ref, index_name, hash_digest, indexed_at FROM es_documents WHERE uuid_ref = %(uuid_ref)s;

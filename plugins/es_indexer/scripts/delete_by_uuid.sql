DELETE FROM es_documents WHERE uuid_ref = %(uuid_ref)s;

SELECT uuid_ref, hash_digest, pages, chars, truncated, text, extracted_at
FROM pdf_texts WHERE uuid_ref = %(uuid_ref)s;

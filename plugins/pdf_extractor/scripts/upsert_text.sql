INSERT INTO pdf_texts (uuid_ref, hash_digest, pages, chars, truncated, text, extracted_at)
VALUES (%(uuid_ref)s, %(hash_digest)s, %(pages)s, %(chars)s, %(truncated)s, %(text)s, %(extracted_at)s)
ON CONFLICT (uuid_ref) DO UPDATE SET
    hash_digest = excluded.hash_digest,
    pages = excluded.pages,
    chars = excluded.chars,
    truncated = excluded.truncated,
    text = excluded.text,
    extracted_at = excluded.extracted_at;

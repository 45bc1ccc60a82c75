SELECT uuid_ref, data_location, data_size FROM sizes
WHERE data_size > %(data_size)s ORDER BY data_size DESC LIMIT 100;

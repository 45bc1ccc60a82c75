from tests.services import (  # noqa: F401 (fixtures, used by name)
    pg_schema,
    pg_section,
    postgres_server,
    redis_client,
    redis_prefix,
    redis_section,
    redis_server,
)

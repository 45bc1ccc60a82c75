from tests.rabbitmq.conftest import broker, rabbitmq_up, record_plugin, vhost  # noqa: F401 (fixtures, used by name)
from tests.services import pg_schema, pg_section, postgres_server  # noqa: F401 (fixtures, used by name)

"""sqapi's HTTP API (Flask): core endpoints, dashboard and plugin blueprints."""

"""Connectors: one package per topic, one module per type (the folder is the registry).

* ``data``      -- data stores: ``download_to_disk(config, object_ref) -> str``
* ``meta``      -- meta stores: ``fetch_metadata(config, reference) -> dict``
* ``listeners`` -- message sources: ``Listener(config, process_message)``
* ``db``        -- status databases: ``Database(config)``

Each topic's ``__init__`` states its contract.  Types are resolved by :mod:`sqapi.registry`.
"""

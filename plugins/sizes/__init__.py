"""sizes: records how large each message's data and metadata are (sqAPI's classic example plugin).

One row per message in the plugin's own ``sizes`` table; a redelivered message updates its
row instead of adding another.  Serves ``GET /sizes/<uuid>`` and ``GET /sizes/larger/<bytes>``.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).parent / "scripts"

log = logging.getLogger(__name__)


def execute(config: Any, database: Any, message: Any, metadata: dict[str, Any], data: io.BufferedReader) \
        -> dict[str, int]:
    data_size = data.seek(0, os.SEEK_END)
    row = {
        "uuid_ref": message.uuid,
        "data_location": message.data_location,
        "meta_location": message.meta_location,
        "metadata_size": len(metadata),
        "data_size": data_size,
        "hash_digest": message.hash_digest,
    }
    database.execute_script(str(SCRIPTS / "insert_item.sql"), **row)
    log.debug("sizes of %s: %d metadata fields, %d bytes", message.uuid, len(metadata), data_size)
    return {"metadata_size": len(metadata), "data_size": data_size}

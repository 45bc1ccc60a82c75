"""sqapi: a pluggable message-processing framework.

A listener hands each message to :class:`sqapi.core.processor.Processor`, which
fetches the data and metadata it refers to, runs every active plugin that accepts
the data's mime type, and records every step in the status database.
"""

__version__ = "0.1.0"

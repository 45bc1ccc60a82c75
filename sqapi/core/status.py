"""The statuses of a message and of one plugin's run on it: one enum, stored and shown as its name.

A message goes VALIDATING → QUERYING → PROCESSING, then ends an attempt DONE, RETRY (another
attempt will come) or FAILED.  A plugin's row (``message_plugins``) is PROCESSING while it runs,
then DONE, RETRY or FAILED.  Members are strings (``Status.DONE == "DONE"``), so rows read back
from any database compare equal to them.
"""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    VALIDATING = "VALIDATING"
    QUERYING = "QUERYING"
    PROCESSING = "PROCESSING"
    DONE = "DONE"
    RETRY = "RETRY"
    FAILED = "FAILED"


#: every status, in the order a message goes through them
MESSAGE_STATUSES: tuple[Status, ...] = tuple(Status)
#: the statuses an attempt ends with
FINAL_STATUSES: tuple[Status, ...] = (Status.DONE, Status.FAILED, Status.RETRY)

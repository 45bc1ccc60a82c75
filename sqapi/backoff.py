"""Growing delays between tries: the one helper every retry loop in sqapi uses.

Retries of a message (``msg_broker.retry``), RabbitMQ reconnects, a message that could not be
set aside, PostgreSQL connects at start-up, restarts of a loader process, the webhook's and the
Elasticsearch indexer's requests.
"""

from __future__ import annotations

import math
import random


def exponential(attempt: int, initial: float, cap: float, multiplier: float = 2.0, jitter: bool = False) -> float:
    """Seconds to wait after try number ``attempt`` (1-based): ``initial × multiplier^(attempt-1)``, at most ``cap``.

    With ``jitter``, a random 50 - 100 % of that, so that many clients cut off together do not all
    come back at the same moment.  Any ``attempt`` is safe (one read from a message header may be
    huge): the delay is then ``cap``.
    """
    try:
        delay = initial * multiplier ** max(0, attempt - 1)
    except OverflowError:
        delay = math.inf
    delay = float(min(cap, delay))
    return delay * random.uniform(0.5, 1.0) if jitter else delay

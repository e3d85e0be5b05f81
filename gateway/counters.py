"""What the request path counts for the metrics: plain integers on objects it already holds.

The request path is compiled (mypyc), and a Prometheus client object per request would cost a
lock and a dictionary lookup each time; these cost an attribute increment. `gateway/metrics.py`
reads them when a scrape comes and exports them through prometheus-client.
"""
from __future__ import annotations

# Seconds: from a fast local upstream (a millisecond) to the read timeout's order.
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Redis batches: a fraction of a millisecond when all is well, the socket timeout when not.
BATCH_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class StatusCounts:
    """Replies of one front, by status class."""

    __slots__ = ("informational", "success", "redirection", "client_error", "server_error")

    def __init__(self) -> None:
        self.informational = 0
        self.success = 0
        self.redirection = 0
        self.client_error = 0
        self.server_error = 0

    def count(self, status: int) -> None:
        if status < 300:
            if status < 200:
                self.informational += 1
            else:
                self.success += 1
        elif status < 400:
            self.redirection += 1
        elif status < 500:
            self.client_error += 1
        else:
            self.server_error += 1

    def by_class(self) -> dict[str, int]:
        return {"1xx": self.informational, "2xx": self.success, "3xx": self.redirection, "4xx": self.client_error,
                "5xx": self.server_error}


class Buckets:
    """A histogram as counts: `counts[i]` observations at most `bounds[i]`, the last one above all."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # A loop, not bisect: compiled, it compares unboxed floats and most observations stop at
        # the first bounds; bisect was a generic call with a boxed float per comparison.
        index = 0
        for bound in self.bounds:
            if seconds <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.total += seconds

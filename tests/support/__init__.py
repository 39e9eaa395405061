"""What the tests stand on: an in-process worker and its requester (``worker``), worker
subprocesses behind fault proxies (``harness``, ``proxy``)."""

"""What ``forge-worker run`` is: the pipeline one message walks, and what keeps it running.

receive (``broker``) → decode → resolve → validate → execute (``consumer``, with the
handlers of ``worker.commands``) → store (``store``: the ledger and the effects, one
statement) → publish (``broker``, ``batch_publish``) → ack (``consumer``, the one place that
decides ack, retry or dead-letter); ``app`` holds the lifecycle, ``http`` and ``metrics``
the operator's view of a running worker, ``depth`` the queue gauges.

May import: ``worker.ucan``, ``worker.commands``, ``worker.amqp``, ``worker.config``,
``worker.errors``, ``worker.log``, ``worker.keyfile``; never ``worker.operate`` or
``worker.produce``.
"""

"""What operators run: ``status``, dead letters (``dlq list|show|replay|purge``), ``inspect``.

``status`` reads queue depths; ``deadletters`` describes and selects dead letters;
``scan`` reads a queue with ``basic.get`` and hands back what it does not settle; ``replay``
and ``purge`` move or delete them (confirm-then-ack, paced), each with its row in ``audit``;
``dlq`` is the command over them; ``inspect`` decodes and validates a message offline.

May import: ``worker.ucan``, ``worker.amqp``, ``worker.config``, ``worker.errors``,
``worker.log``; never ``worker.service`` or ``worker.produce``.
"""

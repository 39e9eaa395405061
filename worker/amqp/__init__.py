"""Broker helpers shared by the service, the operators' tools and the producers' tools.

What every side of the project needs to speak AMQP the same way: queue names and the
worker's headers (``topology``), the codec guard that makes pamqp total on what a
publisher can write and checks what we write (``guard``), a publish with confirms and the
one way its failures are named (``publish``), connections to a broker given as a list of
nodes, with passwords never shown (``connect``), and queue depths by passive declares
(``queues``).

May import: ``worker.config``, ``worker.errors``, ``worker.log`` and the AMQP libraries;
never ``worker.service``, ``worker.operate`` or ``worker.produce``.
"""

"""What producers run: the client API, and the commands that sign and publish requests.

``client`` is the Python API (build and sign as Hilt does, publish with confirms, await and
verify the receipt; ``worker.client`` re-exports it); ``keys`` has ``keygen`` and
``delegate``; ``enqueue`` publishes ``/customer/add`` one at a time or in bulk (``bulk``
reads the input); ``options`` checks the commands' values. Keys are read by
``worker.keyfile``.

May import: ``worker.ucan``, ``worker.amqp``, ``worker.config``, ``worker.errors``,
``worker.log``, ``worker.keyfile``; never ``worker.service`` or ``worker.operate``.
"""

"""What producers run: the client API, and the commands that sign and publish requests.

``client`` is the Python API (publish with confirms, await and verify the receipt;
``worker.client`` re-exports it), over ``invocations`` (build and sign ``/customer/add``,
``/provider/add`` and ``/space/info`` as Hilt does, read receipts: pure); ``keys`` has
``keygen``, ``did`` and ``delegate``; ``enqueue`` publishes ``/customer/add`` one at a time
or in bulk (``bulk`` reads the input); ``offline`` writes a signed request to a file
(``--out``); ``options`` checks the commands' values. Keys are read by ``worker.keyfile``.

May import: ``worker.ucan``, ``worker.amqp``, ``worker.config``, ``worker.errors``,
``worker.log``, ``worker.keyfile``; never ``worker.service`` or ``worker.operate``.
"""

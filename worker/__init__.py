"""forge-worker: the upload service's RabbitMQ inbox for signed UCAN 1.0 invocations."""

__version__ = "0.1.0"

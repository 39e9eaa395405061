"""Broker helpers shared by the service, the operators' tools and the producers' tools:
what every part that talks to RabbitMQ needs the same way, such as a list of broker URLs
to fail over between (:mod:`worker.amqp.failover`)."""

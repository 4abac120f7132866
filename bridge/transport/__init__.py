"""AMQP transport: consumers for add/fetch/ack, replies, and the results publisher."""

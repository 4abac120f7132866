"""Queue semantics: add, fetch, ack, recovery and result delivery, independent of AMQP."""

"""The HTTP gateway (opt-in, ``BRIDGE_GATEWAY_PORT``): the AMQP contract over HTTP, one endpoint per
method, bearer API keys mapped to owners. See :mod:`bridge.gateway.server`."""

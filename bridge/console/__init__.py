"""The operator console (issue 11): one static page at ``/console`` on the gateway's port, and the
JSON it reads under ``/console/api/`` (every one behind the gateway's bearer keys).

- :mod:`bridge.console.page`: the page itself (inline JS and CSS, no build step, nothing fetched
  from anywhere but this bridge); it asks for an API key, keeps it in ``sessionStorage`` and sends
  it as ``Authorization: Bearer`` on every data request. The page holds no data: it is public.
- :mod:`bridge.console.routes`: the endpoints (services and their counts, the chart's series, one
  task's history, the parked list, redrive and discard when ``BRIDGE_CONSOLE_WRITE`` allows).
- :mod:`bridge.console.history`: the chart's per-minute ring of this bridge's counters.
"""

CONSOLE_PATH = "/console"
CONSOLE_API = "/console/api"

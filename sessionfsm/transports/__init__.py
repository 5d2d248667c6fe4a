"""Ready-made transports for :class:`sessionfsm.Runner` (optional extras).

* :mod:`sessionfsm.transports.http`: :class:`~sessionfsm.transports.http.HttpTransport`
  on httpx (``pip install 'sessionfsm[http]'``);
* :mod:`sessionfsm.transports.socketio`:
  :class:`~sessionfsm.transports.socketio.SocketIOTransport` on python-socketio
  (``pip install 'sessionfsm[socketio]'``).

Import the submodule you need; this package imports neither, so
``import sessionfsm.transports`` works without the extras. The wire format
both share lives in :mod:`sessionfsm.transports.wire` (core dependencies only).
"""

"""``edgefed dashboard``: a web page that is itself an MQTT client of the federation's broker.

The page (``static/``) connects over WebSockets and reads the JSON copies the aggregator keeps
retained (``metrics/json``, ``status/<device>/json``), so the server only hands out files:
the page, its vendored libraries (MQTT.js and uPlot, built files with their licences, so it
works offline) and ``config.json`` naming the broker's WebSocket URL and the federation.
"""

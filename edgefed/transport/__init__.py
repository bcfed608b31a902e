"""The MQTT transport: the client, its in-memory stand-in, message frames and brokers."""

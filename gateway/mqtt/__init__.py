"""The MQTT front: a proxy in front of an MQTT broker, with the tokens, cache, checks and writers of
the HTTP side (docs/mqtt.md). `front.MqttFront` holds what every session shares; `session.Session`
is one client; `listener` serves TCP and `websocket` MQTT over WebSocket."""

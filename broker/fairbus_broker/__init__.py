"""Broker bring-up for the MQTT bus: Mosquitto configuration (listener, password file or TLS
client certificates, an ACL from the roster), the embedded amqtt broker, and the one way
fairbus opens an MQTT client.

Modules: :mod:`fairbus_broker.config` (the TOML file), :mod:`fairbus_broker.acl` (who may
publish and read what), :mod:`fairbus_broker.passwords` (Mosquitto ``$7$`` hashes),
:mod:`fairbus_broker.logins` (roster plus ``<id>.mqtt.key`` files),
:mod:`fairbus_broker.mosquitto` (files and child process), :mod:`fairbus_broker.embedded`
(amqtt in-process; imports amqtt, the optional ``[embedded]`` extra) and
:mod:`fairbus_broker.mqtt` (the client factory).
"""

"""Broker bring-up for the MQTT bus: Mosquitto configuration (listener, password file or TLS
client certificates, an ACL from the roster) and the embedded amqtt broker.

Modules: :mod:`broker.config` (the TOML file), :mod:`broker.acl` (who may publish and read
what), :mod:`broker.passwords` (Mosquitto ``$7$`` hashes), :mod:`broker.logins` (roster plus
``<id>.mqtt.key`` files), :mod:`broker.mosquitto` (files and child process) and
:mod:`broker.embedded` (amqtt in-process; imports amqtt, the optional ``[embedded]`` extra).
"""

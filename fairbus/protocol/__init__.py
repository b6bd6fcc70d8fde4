"""Sans-I/O protocol machines (docs/architecture.md, "State machines"): events in, messages out.

:class:`~fairbus.protocol.provider.ProviderMachine` and
:class:`~fairbus.protocol.user.UserMachine` never touch a socket, a clock or a model:
they take events (:mod:`fairbus.protocol.events`) and return outputs — messages to send
(bytes that are signed envelopes or sealed shares) and effects for the driver to carry
out (train a model, evaluate one) whose results come back as events. The in-process
simulator and the MQTT runtime drive the very same machines.
"""

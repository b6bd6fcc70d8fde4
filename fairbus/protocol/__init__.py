"""Sans-I/O protocol machines (docs/architecture.md, "State machines"): events in, outputs out.

:class:`~fairbus.protocol.provider.ProviderMachine` and
:class:`~fairbus.protocol.user.UserMachine` never touch a socket, a clock or a model:
they take events (:mod:`fairbus.protocol.events`) and return outputs — ledger
transactions to commit and deliver with their receipts (``Commit``, a signed envelope),
sealed shares to send (``Send``), and effects for the driver to carry out (train a
model, evaluate one) whose results come back as events. The machines check the ledger
receipt of every broadcast and upload themselves. The in-process simulator and the MQTT
runtime drive the very same machines, and only through these events.
"""

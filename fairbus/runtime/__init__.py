"""The networked runtime: the provider and user machines of :mod:`fairbus.protocol`
driven over MQTT, recording on the ledger (``fairbus provider``, ``fairbus user``)."""

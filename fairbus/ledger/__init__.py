"""The pure ledger: records and blocks, receipts, and the validation state machine with
its contracts. No I/O; the ledger service (``fairbus_ledger_service``), the simulator and
``fairbus audit`` all run this same code (see ``docs/architecture.md``)."""

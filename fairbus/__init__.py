"""fairbus: fair, privacy-preserving federated training over MQTT with a Raft-replicated ledger.

The pure core (no I/O) lives here: field arithmetic and fixed point
(:mod:`fairbus.field`), CSPRNG expansion (:mod:`fairbus.csprng`), vector Shamir
(:mod:`fairbus.shamir`), Algorithm 3 key negotiation (:mod:`fairbus.keyneg`),
Algorithms 4-5 masking and aggregate decryption (:mod:`fairbus.masking`),
identities and the roster, signed and sealed envelopes, and the wire format.
"""

__version__ = "0.1.0"

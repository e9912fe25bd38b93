"""Several coordinator processes as one marketplace: who is alive, what each owns, how they meet.

- ``lease.py``: every replica holds a lease (a row renewed on the database clock); the things a
  replica owns in the database (ledger holds, miner snapshot rows, spend reservations) carry its
  id, and a replica whose lease ran out is cleaned up by another one, exactly once.
- ``mesh.py``, ``relay.py``, ``remote_worker.py``, ``codec.py``: the NATS link through which
  every replica routes its buyers to every replica's miners.
"""

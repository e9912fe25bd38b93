"""Several coordinator replicas over one PostgreSQL: who is alive, and what each one owns.

``lease.py``: every replica holds a lease (a row renewed on the database clock); the things a
replica owns in the database (ledger holds, miner snapshot rows, spend reservations) carry its
id, and a replica whose lease ran out is cleaned up by another one, exactly once.
"""

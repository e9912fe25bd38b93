"""What buyers may spend and what they spent: API keys, the in-memory credit estimate, rate
and spend limits, the job log, usage reports, and the ledger receipts sent to miners."""

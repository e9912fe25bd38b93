"""Which miner serves a request: the registry of connected miners, their measured speed, the
router, the privacy tiers, and the dispatcher that waits for a slot and fails over."""

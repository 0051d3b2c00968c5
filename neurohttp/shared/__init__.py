"""State shared by every worker of a server: exact counters and rate limiters
(GCRA, fixed windows) in the shared-memory block, behind the `Store`
interface that a Redis backend can implement too. See docs/ARCHITECTURE.md,
"Shared state"."""
